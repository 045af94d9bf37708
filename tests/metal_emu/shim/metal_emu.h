// The stand-in for Apple's <metal_stdlib> when MSL is compiled as C++: the
// generated source includes this first, then the rewritten kernel file.
#pragma once

#include "../runtime/abi.h"
#include "atomic.h"
#include "bind.h"
#include "math.h"
#include "simd.h"
#include "simdgroup_matrix.h"
#include "types.h"
#include "vec.h"

#define METAL_FUNC inline

// The address spaces, erased at the very end so that nothing above sees
// them: the emulator runs everything in one flat address space. `constant`
// data is read-only, so MSL code may omit the const the C++ needs.
#define device
#define constant const
#define threadgroup
#define thread
#define threadgroup_imageblock
#define ray_data
#define object_data
