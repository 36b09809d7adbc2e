/// \file
/// head-attention: causal single-head self-attention (simple_llm's HeadAttention) for C++17 and Eigen 3.4.
/// Include this header to get everything.
#pragma once

/// \namespace head_attention
/// The library's API: everything in it but head_attention::detail, whose contents may change in any release
/// (see docs/guarantees.md, "Versioning").

#include "arguments.hpp"
#include "attention.hpp"
#include "batched.hpp"
#include "errors.hpp"
#include "forms.hpp"
#include "gradients.hpp"
#include "kv_cache.hpp"
#include "linear.hpp"
#include "mask.hpp"
#include "multi_head_attention.hpp"
#include "packed.hpp"
#include "precision.hpp"
#include "reference.hpp"
#include "tensor_forms.hpp"
#include "version.hpp"
#include "workspace.hpp"
