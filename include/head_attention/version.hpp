/// \file
/// head-attention: the library version. The one source of the version is project(VERSION) in CMakeLists.txt;
/// these macros repeat it for code that includes the headers without CMake, and the ctest test
/// version.consistency fails when they disagree with it.
#pragma once

/// Major version: raised for changes that break the API (everything in namespace head_attention outside
/// head_attention::detail).
#define HEAD_ATTENTION_VERSION_MAJOR 0
/// Minor version: raised for additions that keep the API compatible (while the major version is 0, also for
/// incompatible changes, which CHANGELOG.md then lists).
#define HEAD_ATTENTION_VERSION_MINOR 2
/// Patch version: raised for fixes that change no API.
#define HEAD_ATTENTION_VERSION_PATCH 0
