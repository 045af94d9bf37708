// Stand-in for Apple's <objc/runtime.h> (Linux compile checks only): the
// types and functions metal-cpp names, with Apple's arm64 signatures.
#pragma once

#include <stdbool.h>

typedef struct objc_class* Class;
struct objc_object {
  Class isa;
};
typedef struct objc_object* id;
typedef struct objc_selector* SEL;
typedef bool BOOL;
#ifdef __cplusplus
class Protocol;
extern "C" {
#else
typedef struct objc_object Protocol;
#endif
SEL sel_registerName(const char* str);
Class objc_lookUpClass(const char* name);
Protocol* objc_getProtocol(const char* name);
#ifdef __cplusplus
}
#endif
