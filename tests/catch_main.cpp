// The main() of every test executable when building against Catch2 2 (Catch2 3 links Catch2WithMain instead).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
