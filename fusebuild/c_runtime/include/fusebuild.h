/* fusebuild.h: the C runtime of fusebuild (DESIGN §12). Pure C99, usable from C++.

   In progress (issue 23): this version gives the ABI version, status codes and error
   messages, the DLPack types, and the ArgSpec key of a group call (DESIGN §2), the same string
   as Python's `k.group.key(...)`. Loading bundles and calling kernels come later.

   Conventions: every function returning fb_status returns FB_OK or an error code and then
   leaves a message for fb_last_error(); nothing aborts, prints or exits. Structs passed in
   carry their size (sizeof) as their first field and only ever grow at the end.

   Build: cc $(python -m fusebuild.c_runtime --cflags) app.c $(python -m fusebuild.c_runtime --libs)
   If you also use DLPack's own dlpack.h, include it before this header: its types are then
   used (the layouts are the same). */
#ifndef FUSEBUILD_H
#define FUSEBUILD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define FB_API __attribute__((visibility("default")))
#else
#define FB_API
#endif

/* ---- version ---- */

/* major << 16 | minor. A library or bundle of another major version is refused; a minor
   version only adds (functions, enum values, struct fields at the end). Major 0: the ABI is
   still being built (issue 23) and may change. */
#define FB_ABI_VERSION_MAJOR 0
#define FB_ABI_VERSION_MINOR 1
#define FB_ABI_VERSION ((FB_ABI_VERSION_MAJOR << 16) | FB_ABI_VERSION_MINOR)

/* The FB_ABI_VERSION the library was built with (compare its major, `>> 16`, with yours). */
FB_API uint32_t fb_abi_version(void);

/* ---- errors ---- */

typedef enum fb_status {
    FB_OK = 0,
    FB_E_NOT_FOUND = 1,     /* no such group, or no kernel for the call's key */
    FB_E_DTYPE = 2,         /* an input's dtype is not one fusebuild knows */
    FB_E_SHAPE = 3,         /* shapes that do not broadcast, chunk or concatenate */
    FB_E_INTEGRITY = 4,     /* an artifact whose hash or self-description differs */
    FB_E_FORMAT = 5,        /* a bundle of another format or ABI major version */
    FB_E_ISA = 6,           /* no kernel for this CPU's ISA level */
    FB_E_DEVICE = 7,        /* a device the bundle has no kernel for */
    FB_E_IO = 8,            /* a file that cannot be read */
    FB_E_ARGUMENT = 9       /* a NULL pointer, a bad count or size, a buffer too small */
} fb_status;

/* The message of this thread's most recent failed call ("" if none); valid until the thread's
   next fusebuild call. */
FB_API const char *fb_last_error(void);

/* ---- DLPack (written from the DLPack 1.x specification; same layout as dlpack.h) ---- */

#ifndef DLPACK_MAJOR_VERSION
typedef enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLOpenCL = 4,
    kDLVulkan = 7,
    kDLMetal = 8,
    kDLVPI = 9,
    kDLROCM = 10,
    kDLROCMHost = 11,
    kDLExtDev = 12,
    kDLCUDAManaged = 13,
    kDLOneAPI = 14,
    kDLWebGPU = 15,
    kDLHexagon = 16,
    kDLMAIA = 17
} DLDeviceType;

typedef struct {
    DLDeviceType device_type;
    int32_t device_id;
} DLDevice;

typedef enum {
    kDLInt = 0,
    kDLUInt = 1,
    kDLFloat = 2,
    kDLOpaqueHandle = 3,
    kDLBfloat = 4,
    kDLComplex = 5,
    kDLBool = 6,
    kDLFloat8_e3m4 = 7,
    kDLFloat8_e4m3 = 8,
    kDLFloat8_e4m3b11fnuz = 9,
    kDLFloat8_e4m3fn = 10,
    kDLFloat8_e4m3fnuz = 11,
    kDLFloat8_e5m2 = 12,
    kDLFloat8_e5m2fnuz = 13,
    kDLFloat8_e8m0fnu = 14,
    kDLFloat6_e2m3fn = 15,
    kDLFloat6_e3m2fn = 16,
    kDLFloat4_e2m1fn = 17
} DLDataTypeCode;

typedef struct {
    uint8_t code;           /* a DLDataTypeCode */
    uint8_t bits;
    uint16_t lanes;         /* fusebuild takes 1 */
} DLDataType;

typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;         /* ndim sizes */
    int64_t *strides;       /* ndim strides in elements; NULL: C-contiguous */
    uint64_t byte_offset;
} DLTensor;
#endif

/* ---- the ArgSpec key ---- */

#define FB_MAX_RANK 64      /* the most dims of an input (numpy's) */
#define FB_MAX_INPUTS 32    /* the most tensor inputs of a group */
#define FB_MAX_OUTPUTS 16   /* the most outputs of a group */

/* An input chunked, or an output concatenated, `n` ways along `dim` (negative: from the end);
   n = 0: not chunked / concatenated. */
typedef struct fb_split {
    int32_t n;
    int32_t dim;
} fb_split;

/* What the key of a group's call depends on, as in the bundle's manifest (Python's
   runtime.dispatch.GroupInfo). Optional arrays may be NULL (none chunked, no names ...). */
typedef struct fb_group_info {
    size_t struct_size;              /* sizeof(fb_group_info) */
    const char *name;                /* the group's name: an identifier */
    int32_t n_inputs;                /* tensor inputs, in declared order (scalars are not keyed) */
    const char *const *input_names;  /* n_inputs names for messages, or NULL */
    const fb_split *chunks;          /* per tensor input, or NULL */
    int32_t n_outputs;
    const fb_split *cats;            /* per output, or NULL */
    const uint8_t *row_outputs;      /* per output, nonzero: one value per row, or NULL */
    int32_t reduces;                 /* nonzero: the group reduces over the last dim (§8) */
} fb_group_info;

/* The ArgSpec key of calling `group` on tensor inputs `inputs[0..n_inputs)`, e.g.
   "bias_gelu(f32:cc,f32:bc)": written NUL-terminated to key[0..key_size) when it fits; its
   length (without the NUL) goes to *key_len (may be NULL) on FB_OK and on a key too long for
   key_size (FB_E_ARGUMENT; key may be NULL with key_size 0 to ask for the length).
   Errors: FB_E_ARGUMENT (NULL pointers, a count that is not the group's, a malformed group),
   FB_E_DTYPE (a dtype fusebuild has no kernels for), FB_E_SHAPE (inputs that do not
   broadcast or chunk, a rank above FB_MAX_RANK, more elements than int64 counts). The device
   and data pointers are not read. */
FB_API fb_status fb_argspec_key(const fb_group_info *group, const DLTensor *const *inputs,
                                int32_t n_inputs, char *key, size_t key_size, size_t *key_len);

#ifdef __cplusplus
}
#endif

#endif /* FUSEBUILD_H */
