/* The ABI version and the thread-local error message. */
#include <stdarg.h>
#include <stdio.h>

#include "internal.h"

static _Thread_local char last_error[1024];

uint32_t fb_abi_version(void)
{
    return FB_ABI_VERSION;
}

const char *fb_last_error(void)
{
    return last_error;
}

fb_status fb_fail(fb_status status, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    vsnprintf(last_error, sizeof last_error, format, args);
    va_end(args);
    return status;
}
