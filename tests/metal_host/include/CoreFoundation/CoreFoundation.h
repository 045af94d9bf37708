// Stand-in for Apple's <CoreFoundation/CoreFoundation.h> (Linux compile
// checks only): the types metal-cpp names, and the C headers the real one
// brings in that metal-cpp relies on (INFINITY).
#pragma once

#include <math.h>
#include <stdbool.h>
#include <stdint.h>

typedef double CFTimeInterval;
typedef long CFIndex;
typedef const void* CFTypeRef;
typedef const struct __CFString* CFStringRef;
