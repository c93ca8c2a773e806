/* The ArgSpec key of a group call (DESIGN §2, §8): the C form of Python's
   runtime.dispatch.check (the checks that decide the key) + argspec.canonicalize + format_key,
   with the same messages. tests/test_c_runtime.py holds the two equal on random calls. */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "internal.h"

#define MAX_OPERANDS (FB_MAX_INPUTS + FB_MAX_OUTPUTS)

/* The dtypes of kernels, in the order Python's messages list them (dtypes.ALL). */
static const struct {
    uint8_t code, bits;
    const char *name, *short_name;
} DTYPES[] = {
    {kDLBool, 8, "bool", "b8"},         {kDLInt, 8, "int8", "i8"},
    {kDLInt, 16, "int16", "i16"},       {kDLInt, 32, "int32", "i32"},
    {kDLInt, 64, "int64", "i64"},       {kDLUInt, 8, "uint8", "u8"},
    {kDLFloat, 16, "float16", "f16"},   {kDLBfloat, 16, "bfloat16", "bf16"},
    {kDLFloat, 32, "float32", "f32"},   {kDLFloat, 64, "float64", "f64"},
};
#define N_DTYPES (sizeof DTYPES / sizeof DTYPES[0])

/* A bounded string builder: text past `cap` is counted, not written. */
typedef struct {
    char *buf;
    size_t cap, len;
} text;

static void add(text *t, const char *format, ...)
{
    va_list args;
    va_start(args, format);
    size_t room = t->len < t->cap ? t->cap - t->len : 0;
    int n = vsnprintf(room ? t->buf + t->len : NULL, room, format, args);
    va_end(args);
    if (n > 0)
        t->len += (size_t)n;
}

/* One tensor input as the key sees it: the sizes of its chunk view are
   shape[i] / (i == axis ? n : 1). */
typedef struct {
    const DLTensor *t;
    const char *short_name;
    int32_t axis, n;
} view;

static int64_t view_size(const view *v, int32_t i)
{
    return i == v->axis ? v->t->shape[i] / v->n : v->t->shape[i];
}

static const char *input_name(const fb_group_info *g, int32_t j, char *buf, size_t size)
{
    if (g->input_names && g->input_names[j])
        return g->input_names[j];
    snprintf(buf, size, "input%d", (int)j);
    return buf;
}

/* Python's repr of a view's shape, as a list or (`tuple`) a tuple: [4, 8], (4, 8), (8,). */
static void add_shape(text *t, const view *v, int tuple)
{
    add(t, tuple ? "(" : "[");
    for (int32_t i = 0; i < v->t->ndim; i++)
        add(t, i ? ", %lld" : "%lld", (long long)view_size(v, i));
    add(t, tuple && v->t->ndim == 1 ? ",)" : tuple ? ")" : "]");
}

static int is_identifier(const char *s)
{
    if (!s || !((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || *s == '_'))
        return 0;
    for (; *s; s++)
        if (!((*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9')
              || *s == '_'))
            return 0;
    return 1;
}

static fb_status check_group(const fb_group_info *g)
{
    if (!g)
        return fb_fail(FB_E_ARGUMENT, "fb_argspec_key: group is NULL");
    if (g->struct_size < offsetof(fb_group_info, reduces) + sizeof g->reduces)
        return fb_fail(FB_E_ARGUMENT, "fb_group_info.struct_size is %zu, less than the %zu bytes "
                       "of this ABI's fields: set it to sizeof(fb_group_info)", g->struct_size,
                       offsetof(fb_group_info, reduces) + sizeof g->reduces);
    if (!is_identifier(g->name))
        return fb_fail(FB_E_ARGUMENT, "fb_group_info.name is %s, not an identifier",
                       g->name ? "a string" : "NULL");
    if (g->n_inputs < 0 || g->n_inputs > FB_MAX_INPUTS || g->n_outputs < 0
        || g->n_outputs > FB_MAX_OUTPUTS)
        return fb_fail(FB_E_ARGUMENT, "%s has %d tensor inputs and %d outputs: the C runtime "
                       "takes 0 to %d inputs and 0 to %d outputs", g->name, (int)g->n_inputs,
                       (int)g->n_outputs, FB_MAX_INPUTS, FB_MAX_OUTPUTS);
    for (int32_t j = 0; g->chunks && j < g->n_inputs; j++)
        if (g->chunks[j].n < 0)
            return fb_fail(FB_E_ARGUMENT, "%s: chunks[%d].n is %d (0: not chunked)", g->name,
                           (int)j, (int)g->chunks[j].n);
    for (int32_t k = 0; g->cats && k < g->n_outputs; k++)
        if (g->cats[k].n < 0)
            return fb_fail(FB_E_ARGUMENT, "%s: cats[%d].n is %d (0: not concatenated)", g->name,
                           (int)k, (int)g->cats[k].n);
    return FB_OK;
}

static const char *short_dtype(DLDataType d)
{
    for (size_t i = 0; i < N_DTYPES; i++)
        if (d.code == DTYPES[i].code && d.bits == DTYPES[i].bits && d.lanes == 1)
            return DTYPES[i].short_name;
    return NULL;
}

/* Checks input j and fills its view: the checks of dispatch.check, in its order. */
static fb_status check_input(const fb_group_info *g, int32_t j, const DLTensor *t, view *v)
{
    char buf[24];
    const char *name = input_name(g, j, buf, sizeof buf);
    if (!t)
        return fb_fail(FB_E_ARGUMENT, "input '%s' of %s is NULL", name, g->name);
    if (t->ndim < 0 || (t->ndim > 0 && !t->shape))
        return fb_fail(FB_E_ARGUMENT, "input '%s' of %s has ndim %d and %s shape", name, g->name,
                       (int)t->ndim, t->shape ? "a" : "a NULL");
    if (t->ndim > FB_MAX_RANK)
        return fb_fail(FB_E_SHAPE, "input '%s' of %s has %d dims, more than %d", name, g->name,
                       (int)t->ndim, FB_MAX_RANK);
    v->t = t;
    v->short_name = short_dtype(t->dtype);
    if (!v->short_name) {
        char list[160];
        text l = {list, sizeof list, 0};
        for (size_t i = 0; i < N_DTYPES; i++)
            add(&l, i ? ", %s" : "%s", DTYPES[i].name);
        return fb_fail(FB_E_DTYPE, "input '%s' of %s has unsupported dtype (DLPack code %u, bits "
                       "%u, lanes %u); supported: %s", name, g->name, t->dtype.code,
                       t->dtype.bits, t->dtype.lanes, list);
    }
    for (int32_t i = 0; i < t->ndim; i++)
        if (t->shape[i] < 0)
            return fb_fail(FB_E_SHAPE, "input '%s' of %s has size %lld in dim %d", name, g->name,
                           (long long)t->shape[i], (int)i);
    v->axis = -1;
    v->n = 1;
    if (!g->chunks || !g->chunks[j].n)
        return FB_OK;
    int32_t n = g->chunks[j].n, dim = g->chunks[j].dim;
    int64_t axis = dim < 0 ? (int64_t)dim + t->ndim : dim;
    if (axis < 0 || axis >= t->ndim || t->shape[axis] % n) {
        char msg[800];
        text m = {msg, sizeof msg, 0};
        add(&m, "input '%s' of %s is chunked %d ways along dim %d, which its shape ", name,
            g->name, (int)n, (int)dim);
        add_shape(&m, v, 1);
        return fb_fail(FB_E_SHAPE, "%s does not allow", msg);
    }
    v->axis = (int32_t)axis;
    v->n = n;
    return FB_OK;
}

/* numpy broadcasting of the views' shapes into shape[0..*rank) (argspec.broadcast_shapes). */
static fb_status broadcast(const fb_group_info *g, const view *views, int64_t *shape,
                           int32_t *rank)
{
    int32_t r = 0;
    for (int32_t j = 0; j < g->n_inputs; j++)
        r = views[j].t->ndim > r ? views[j].t->ndim : r;
    for (int32_t i = 0; i < r; i++) {
        int64_t size = 1;
        for (int32_t j = 0; j < g->n_inputs; j++) {
            int32_t d = views[j].t->ndim - r + i;
            if (d < 0 || view_size(&views[j], d) == 1)
                continue;
            if (size == 1) {
                size = view_size(&views[j], d);
            } else if (view_size(&views[j], d) != size) {
                char msg[1500], buf[24];
                text m = {msg, sizeof msg, 0};
                add(&m, "inputs of %s do not broadcast (", g->name);
                for (int32_t k = 0; k < g->n_inputs; k++) {
                    add(&m, "%s%s", k ? ", " : "", input_name(g, k, buf, sizeof buf));
                    add_shape(&m, &views[k], 0);
                }
                return fb_fail(FB_E_SHAPE, "%s): dimension %d has sizes %lld and %lld", msg,
                               (int)(i - r), (long long)size,
                               (long long)view_size(&views[j], d));
            }
        }
        shape[i] = size;
    }
    *rank = r;
    return FB_OK;
}

/* Whether the sizes shape[0..rank) other than 0 multiply to an int64 (then so do the sizes
   and strides canonicalize and contiguous make of them). */
static int counts(const int64_t *shape, int32_t rank)
{
    int64_t n = 1;
    for (int32_t i = 0; i < rank; i++)
        if (shape[i] && __builtin_mul_overflow(n, shape[i], &n))
            return 0;
    return 1;
}

/* C-contiguous element strides of shape[0..rank) into strides; 0 if a stride passes int64. */
static int contiguous(const int64_t *shape, int32_t rank, int64_t *strides)
{
    int64_t acc = 1;
    for (int32_t i = rank - 1; i >= 0; i--) {
        strides[i] = acc;
        if (i && __builtin_mul_overflow(acc, shape[i], &acc))
            return 0;
    }
    return 1;
}

/* An input's strides over the iteration shape (the first loop of argspec.canonicalize): 0 on
   padded dims and on broadcast size-1 dims. */
static int input_strides(const view *v, const int64_t *shape, int32_t rank, int64_t *out)
{
    int32_t pad = rank - v->t->ndim;
    if (v->t->strides)
        memcpy(out + pad, v->t->strides, (size_t)v->t->ndim * sizeof *out);
    else if (!contiguous(v->t->shape, v->t->ndim, out + pad))
        return 0;
    for (int32_t i = 0; i < rank; i++)
        if (i < pad || (view_size(v, i - pad) == 1 && shape[i] != 1))
            out[i] = 0;
    return 1;
}

/* An output's strides over the iteration shape: C-contiguous over its full shape (a cat
   output's is longer along its dim), or a row output's (argspec.row_strides). */
static fb_status output_strides(const fb_group_info *g, int32_t k, const int64_t *shape,
                                int32_t rank, int64_t *out)
{
    int64_t full[FB_MAX_RANK];
    memcpy(full, shape, (size_t)rank * sizeof *full);
    if (g->row_outputs && g->row_outputs[k]) {
        if (!rank)            /* only a group that does not reduce: no dims, no strides */
            return FB_OK;
        full[rank - 1] = 1;
        if (!contiguous(full, rank, out))
            goto big;
        out[rank - 1] = 0;
        return FB_OK;
    }
    if (g->cats && g->cats[k].n) {
        int32_t dim = g->cats[k].dim;
        int64_t axis = dim < 0 ? (int64_t)dim + rank : dim;
        if (axis < 0 || axis >= rank)
            return fb_fail(FB_E_SHAPE, "%s concatenates along dim %d, out of range for inputs of "
                           "rank %d", g->name, (int)dim, (int)rank);
        if (__builtin_mul_overflow(full[axis], (int64_t)g->cats[k].n, &full[axis]))
            goto big;
    }
    if (counts(full, rank) && contiguous(full, rank, out))
        return FB_OK;
big:
    return fb_fail(FB_E_SHAPE, "output %d of %s would have more elements than int64 counts",
                   (int)k, g->name);
}

/* argspec.canonicalize on the operands' strides ops[0..n_ops) (rewritten in place to the
   canonical ones) over shape[0..rank); returns the canonical rank, sizes into shape. */
static int32_t canonicalize(int64_t *shape, int32_t rank, int64_t (*ops)[FB_MAX_RANK],
                            int32_t n_ops, int keep_last)
{
    int32_t last = keep_last ? rank - 1 : -1, m = 0;
    for (int32_t i = 0; i < rank; i++) {
        if (shape[i] == 1 && i != last)
            continue;
        int merge = m > 0 && i != last;
        for (int32_t k = 0; merge && k < n_ops; k++) {
            int64_t p;
            merge = !__builtin_mul_overflow(ops[k][i], shape[i], &p) && p == ops[k][m - 1];
        }
        if (merge) {
            shape[m - 1] *= shape[i];     /* no overflow: fb_argspec_key counted them */
            for (int32_t k = 0; k < n_ops; k++)
                ops[k][m - 1] = ops[k][i];
            continue;
        }
        shape[m] = shape[i];
        for (int32_t k = 0; k < n_ops; k++)
            ops[k][m] = ops[k][i];
        m++;
    }
    return m;
}

fb_status fb_argspec_key(const fb_group_info *g, const DLTensor *const *inputs,
                         int32_t n_inputs, char *key, size_t key_size, size_t *key_len)
{
    view views[FB_MAX_INPUTS];
    int64_t shape[FB_MAX_RANK], dense[FB_MAX_RANK], ops[MAX_OPERANDS][FB_MAX_RANK];
    int32_t rank = 0;
    fb_status st = check_group(g);
    if (st)
        return st;
    if (n_inputs != g->n_inputs || (n_inputs && !inputs))
        return fb_fail(FB_E_ARGUMENT, "%s takes %d tensor inputs, got %d%s", g->name,
                       (int)g->n_inputs, (int)n_inputs, inputs ? "" : " (inputs is NULL)");
    for (int32_t j = 0; j < n_inputs; j++)
        if ((st = check_input(g, j, inputs[j], &views[j])))
            return st;
    if ((st = broadcast(g, views, shape, &rank)))
        return st;
    if (g->reduces && !rank)
        return fb_fail(FB_E_SHAPE, "%s reduces over the last dim: its inputs need rank >= 1 (got "
                       "only 0-d tensors)", g->name);
    if (!counts(shape, rank))
        return fb_fail(FB_E_SHAPE, "inputs of %s broadcast to more elements than int64 counts",
                       g->name);
    for (int32_t k = 0; k < g->n_outputs; k++)
        if ((st = output_strides(g, k, shape, rank, ops[n_inputs + k])))
            return st;
    for (int32_t j = 0; j < n_inputs; j++)
        if (!input_strides(&views[j], shape, rank, ops[j]))
            return fb_fail(FB_E_SHAPE, "input %d of %s has more elements than int64 counts",
                           (int)j, g->name);
    rank = canonicalize(shape, rank, ops, n_inputs + g->n_outputs, g->reduces != 0);
    contiguous(shape, rank, dense);
    text t = {key, key ? key_size : 0, 0};
    add(&t, "%s(", g->name);
    for (int32_t j = 0; j < n_inputs; j++) {
        add(&t, j ? ",%s:" : "%s:", views[j].short_name);
        for (int32_t i = 0; i < rank; i++)
            add(&t, "%c", ops[j][i] == 0 ? 'b' : ops[j][i] == dense[i] ? 'c' : 's');
    }
    add(&t, ")");
    if (key_len)
        *key_len = t.len;
    if (t.len >= t.cap)
        return fb_fail(FB_E_ARGUMENT, "the key of this call of %s has %zu characters: a buffer "
                       "of %zu does not hold them and the NUL", g->name, t.len, key_size);
    return FB_OK;
}
