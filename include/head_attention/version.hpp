// head-attention: the library version, kept in step with project() in CMakeLists.txt.
#pragma once

#define HEAD_ATTENTION_VERSION_MAJOR 0
#define HEAD_ATTENTION_VERSION_MINOR 1
#define HEAD_ATTENTION_VERSION_PATCH 0
