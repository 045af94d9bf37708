// Stand-in for Apple's <objc/message.h> (Linux compile checks only).
#pragma once

#include <objc/runtime.h>

#ifdef __cplusplus
extern "C" {
#endif
void objc_msgSend(void); // cast to the method's type before each call, as on arm64
#ifdef __cplusplus
}
#endif
