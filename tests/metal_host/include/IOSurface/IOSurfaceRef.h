// Stand-in for Apple's <IOSurface/IOSurfaceRef.h> (Linux compile checks only).
#pragma once

typedef struct __IOSurface* IOSurfaceRef;
