/* What the C runtime's sources share (not installed with the public header). */
#ifndef FUSEBUILD_INTERNAL_H
#define FUSEBUILD_INTERNAL_H

#include "fusebuild.h"

/* Set this thread's fb_last_error() message (printf format) and return `status`. */
fb_status fb_fail(fb_status status, const char *format, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

#endif
