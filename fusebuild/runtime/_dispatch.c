/* The CPU hot path of a group call, in C.

   `Caller` is the base class of fusebuild.runtime.GroupCaller. Its vectorcall serves a call
   whose numpy arrays have shapes, strides and dtypes already seen (a "plan", registered by the
   Python side with `_remember`): it reads the arrays' descriptors, finds the plan in an open
   addressing table, converts scalars and the seed, allocates or checks the outputs, fills the
   kernel's pointer and meta words on the stack and calls the kernel's C symbol directly.
   torch CPU tensors are served the same way once `use_torch` has named their type: their
   sizes, strides, dtype and data pointer are read through their (C-implemented) attributes and
   outputs are made by torch.empty; a tensor that requires grad is served only while grad mode
   is off (below autograd, in the torch ops' kernels), else the Python path refuses the call.
   Calls passing inputs by name go to the Python method `_call_named`.
   Anything it does not recognize (first calls, other foreign arrays, numpy scalars, calls large
   enough to split over threads, anything that must raise an error) goes to the Python method
   `_call`, which handles every case and raises the proper errors. So this file never decides
   what a call means; it only repeats, faster, what `_call` did for the same plan. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

_Static_assert(sizeof(npy_intp) == sizeof(int64_t), "64-bit platforms only");

#define MAX_TENSORS 16
#define MAX_OUTS 8
#define MAX_SCALARS 16
#define MAX_PTRS 64
#define MAX_META 512
#define MAX_KEY (MAX_TENSORS * (2 + 2 * NPY_MAXDIMS))
#define TORCH_MAXDIMS 16          /* torch tensors of higher rank take the Python path */
#define TORCH_KEY (1ll << 62)     /* marks a torch tensor's first key word */
#define MAX_PLANS 4096
#define GIL_FREE_ELEMENTS 16384   /* below this, releasing the GIL costs more than it lends */

typedef void (*kernel_fn)(const int64_t *ptrs, const int64_t *meta, int64_t start, int64_t stop);

enum { SCALAR_F32, SCALAR_F64, SCALAR_INT, SCALAR_BOOL };

typedef struct {
    uint64_t hash;
    Py_ssize_t key_len;
    int64_t *words;                /* key_len key words, then n_meta meta words, then out dims */
    PyObject *keep;                /* the kernel's ctypes function: keeps its library loaded */
    kernel_fn fn;
    int64_t n;
    int users;                     /* calls using it now; a dropped plan is freed by the last */
    int dropped;
    int n_ptrs, n_meta, n_scalars, seed_slot;
    int16_t ptr_src[MAX_PTRS];     /* < n_tensors: tensor input; else n_tensors + output */
    int64_t ptr_off[MAX_PTRS];
    struct { int slot, kind; int64_t lo, hi; } scalar[MAX_SCALARS];
    int torch;                     /* a plan for torch tensors (outputs by torch.empty) */
    struct {
        int ndim;
        npy_intp *dims;
        PyArray_Descr *descr;      /* numpy plans */
        PyObject *shape, *dtype;   /* torch plans: torch.empty's arguments */
        int64_t nbytes;
    } out[MAX_OUTS];
    int64_t lo[MAX_TENSORS], hi[MAX_TENSORS];    /* bytes an input touches around its pointer */
    uint8_t same[MAX_TENSORS][MAX_OUTS];          /* input laid out exactly like the output */
} Plan;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *name;
    int n_args, n_tensors, n_outs, n_scalars, random;
    int too_big;                   /* more inputs or outputs than the fast path holds */
    int tensor_pos[MAX_TENSORS], scalar_pos[MAX_SCALARS];
    Plan **table;                  /* open addressing, power-of-two capacity */
    Py_ssize_t cap, count;
} Caller;

static PyObject *str_out, *str_seed, *str_offset, *str_call, *str_call_named, *zero;
static PyObject *str_is_cpu, *str_is_neg, *str_shape, *str_stride, *str_dtype, *str_data_ptr;
static PyObject *str_requires_grad;
static PyObject *kw_dtype;                  /* ("dtype",) */
static PyTypeObject *torch_tensor;          /* torch.Tensor, once use_torch() named it */
static PyObject *torch_empty, *torch_grad_enabled;

/* ---- arrays ---- */

/* What the fast path reads of a tensor input or output. */
typedef struct {
    int nd;
    int64_t type;                  /* numpy: type_num and byte order; torch: the dtype object */
    const npy_intp *dims, *strides;    /* byte strides (numpy), element strides (torch) */
    char *data;
    npy_intp buf[2 * TORCH_MAXDIMS];
} View;

static int int_tuple(PyObject *t, npy_intp *dst, Py_ssize_t n)
{
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != n)
        return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        dst[i] = PyLong_AsSsize_t(PyTuple_GET_ITEM(t, i));
        if (dst[i] == -1 && PyErr_Occurred())
            return 0;
    }
    return 1;
}

/* Whether torch's grad mode is off (a call on tensors that require grad records nothing). */
static int grad_mode_off(void)
{
    PyObject *on = PyObject_CallNoArgs(torch_grad_enabled);
    int off = on == Py_False;
    Py_XDECREF(on);
    return off;
}

/* 1: `t` is a plain torch CPU tensor (no negative-bit view; requiring grad only with grad
   mode off) and v describes it; 0: it is not, or something could not be read (the error is
   cleared: the Python path will say what). */
static int torch_view(PyObject *t, View *v)
{
    PyObject *cpu, *grad = NULL, *neg = NULL, *shape = NULL, *strides = NULL, *dtype = NULL;
    PyObject *ptr = NULL;
    int ok = 0;
    if (!torch_tensor || Py_TYPE(t) != torch_tensor)
        return 0;
    cpu = PyObject_GetAttr(t, str_is_cpu);
    if (cpu == Py_True && (grad = PyObject_GetAttr(t, str_requires_grad))
        && (grad == Py_False || grad_mode_off())
        && (neg = PyObject_CallMethodNoArgs(t, str_is_neg)) == Py_False
        && (shape = PyObject_GetAttr(t, str_shape)) && PyTuple_Check(shape)
        && PyTuple_GET_SIZE(shape) <= TORCH_MAXDIMS
        && (strides = PyObject_CallMethodNoArgs(t, str_stride))
        && (dtype = PyObject_GetAttr(t, str_dtype))
        && (ptr = PyObject_CallMethodNoArgs(t, str_data_ptr))) {
        v->nd = (int)PyTuple_GET_SIZE(shape);
        v->dims = v->buf;
        v->strides = v->buf + TORCH_MAXDIMS;
        v->type = (int64_t)(intptr_t)dtype;     /* torch's dtype objects live as long as torch */
        v->data = (char *)PyLong_AsVoidPtr(ptr);
        ok = int_tuple(shape, v->buf, v->nd) && int_tuple(strides, v->buf + TORCH_MAXDIMS, v->nd)
             && !PyErr_Occurred();
    }
    Py_XDECREF(cpu);
    Py_XDECREF(grad);
    Py_XDECREF(neg);
    Py_XDECREF(shape);
    Py_XDECREF(strides);
    Py_XDECREF(dtype);
    Py_XDECREF(ptr);
    PyErr_Clear();
    return ok;
}

/* The view of a tensor argument: an exact ndarray, or a torch tensor when `torch`. */
static int view_of(PyObject *a, int torch, View *v)
{
    if (torch)
        return torch_view(a, v);
    if (Py_TYPE(a) != &PyArray_Type)
        return 0;
    PyArrayObject *arr = (PyArrayObject *)a;
    PyArray_Descr *d = PyArray_DESCR(arr);
    v->nd = PyArray_NDIM(arr);
    v->type = d->type_num | (int64_t)(uint8_t)d->byteorder << 32;
    v->dims = PyArray_DIMS(arr);
    v->strides = PyArray_STRIDES(arr);
    v->data = PyArray_BYTES(arr);
    return 1;
}

/* Whether a call is on torch tensors: its first tensor argument (NULL: none) is one. */
static int torch_call(PyObject *first)
{
    return first && torch_tensor && Py_TYPE(first) == torch_tensor;
}

/* ---- plan table ---- */

/* What a plan depends on: kind (numpy or torch), rank, dtype, sizes and strides of every
   tensor input. */
static uint64_t key_of(int n_tensors, int torch, const View *views, int64_t *key, Py_ssize_t *len)
{
    uint64_t h = 0x9E3779B97F4A7C15ull;
    Py_ssize_t k = 0;
    for (int j = 0; j < n_tensors; j++) {
        const View *v = &views[j];
        key[k++] = v->nd | (torch ? TORCH_KEY : 0);
        key[k++] = v->type;
        for (int i = 0; i < v->nd; i++) {
            key[k++] = v->dims[i];
            key[k++] = v->strides[i];
        }
    }
    for (Py_ssize_t i = 0; i < k; i++)
        h = (h ^ (uint64_t)key[i]) * 0x100000001B3ull + (h >> 29);
    *len = k;
    return h;
}

static Plan **slot_of(Caller *self, uint64_t h, const int64_t *key, Py_ssize_t len)
{
    Py_ssize_t mask = self->cap - 1, i = (Py_ssize_t)(h & (uint64_t)mask);
    for (;; i = (i + 1) & mask) {
        Plan *p = self->table[i];
        if (!p || (p->hash == h && p->key_len == len && !memcmp(p->words, key, len * 8)))
            return &self->table[i];
    }
}

static void free_plan(Plan *p)
{
    for (int k = 0; k < MAX_OUTS; k++) {
        Py_XDECREF(p->out[k].descr);
        Py_XDECREF(p->out[k].shape);
        Py_XDECREF(p->out[k].dtype);
    }
    Py_XDECREF(p->keep);
    PyMem_Free(p->words);
    PyMem_Free(p);
}

/* Drop every plan. One a call still uses (it allocates outputs, which may run any Python code
   through the garbage collector, or runs its kernel without the GIL) is freed by that call. */
static void clear_table(Caller *self)
{
    for (Py_ssize_t i = 0; i < self->cap; i++) {
        Plan *p = self->table[i];
        if (p && p->users)
            p->dropped = 1;
        else if (p)
            free_plan(p);
    }
    PyMem_Free(self->table);
    self->table = NULL;
    self->cap = self->count = 0;
}

static int grow_table(Caller *self)
{
    Plan **old = self->table;
    Py_ssize_t old_cap = self->cap, cap = old_cap ? 2 * old_cap : 16;
    Plan **table = PyMem_Calloc(cap, sizeof(Plan *));
    if (!table) {
        PyErr_NoMemory();
        return -1;
    }
    self->table = table;
    self->cap = cap;
    for (Py_ssize_t i = 0; i < old_cap; i++)
        if (old[i])
            *slot_of(self, old[i]->hash, old[i]->words, old[i]->key_len) = old[i];
    PyMem_Free(old);
    return 0;
}

/* ---- the fast path ---- */

/* The meta word of a scalar, or 0 when the value is not a plain Python number of the kind
   the Python path converts the same way (it then raises or converts it there). */
static int scalar_word(PyObject *v, int kind, int64_t lo, int64_t hi, int64_t *word)
{
    int overflow;
    long long x;
    double d;
    if (kind == SCALAR_BOOL) {
        if (v == Py_True || v == Py_False) {
            *word = v == Py_True;
            return 1;
        }
        if (!PyLong_CheckExact(v))
            return 0;
        *word = PyLong_AsLongLongAndOverflow(v, &overflow) != 0 || overflow;
        return 1;
    }
    if (PyFloat_CheckExact(v)) {
        if (kind == SCALAR_INT)
            return 0;
        d = PyFloat_AS_DOUBLE(v);
    } else if (PyLong_CheckExact(v)) {
        x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (x == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        if (kind == SCALAR_INT) {
            if (x < lo || x > hi)
                return 0;
            *word = x;
            return 1;
        }
        if (x > (1ll << 53) || x < -(1ll << 53))   /* not exact in a double: numpy rounds once */
            return 0;
        d = (double)x;
    } else {
        return 0;
    }
    if (kind == SCALAR_F64) {
        memcpy(word, &d, 8);
    } else {
        float f = (float)d;
        uint32_t bits;
        memcpy(&bits, &f, 4);
        *word = bits;
    }
    return 1;
}

static int seed_word(PyObject *v, int64_t *word)
{
    if (!PyLong_CheckExact(v))
        return 0;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *word = (int64_t)x;
    return 1;
}

/* Whether `o` surely passes the Python path's out= checks for output k (other than overlaps). */
static int numpy_out_fits(PyObject *o, const Plan *p, int k, View *v)
{
    if (!view_of(o, 0, v) || v->nd != p->out[k].ndim
        || !PyArray_CHKFLAGS((PyArrayObject *)o, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_WRITEABLE)
        || memcmp(v->dims, p->out[k].dims, v->nd * sizeof(npy_intp)))
        return 0;
    PyArray_Descr *d = PyArray_DESCR((PyArrayObject *)o);
    return d == p->out[k].descr || PyArray_EquivTypes(d, p->out[k].descr);
}

static int torch_out_fits(PyObject *o, const Plan *p, int k, View *v)
{
    if (!torch_view(o, v) || v->nd != p->out[k].ndim
        || v->type != (int64_t)(intptr_t)p->out[k].dtype
        || memcmp(v->dims, p->out[k].dims, v->nd * sizeof(npy_intp)))
        return 0;
    npy_intp step = 1;
    for (int i = v->nd - 1; i >= 0; i--) {      /* contiguous, with the usual strides */
        if (v->strides[i] != step)
            return 0;
        step *= v->dims[i];
    }
    return 1;
}

/* 1: served (*result set), 0: not served (no error set), -1: error. */
static int serve(Caller *self, Plan *p, const View *views, PyObject *out, int64_t *meta,
                 PyObject **result);

static int fast_call(Caller *self, PyObject *const *args, Py_ssize_t nargs, PyObject *out,
                     PyObject *seed, PyObject *offset, PyObject **result)
{
    int64_t key[MAX_KEY], meta[MAX_META];
    View views[MAX_TENSORS];
    Py_ssize_t len;
    if (nargs != self->n_args || !self->count
        || (!self->random && (seed != Py_None || offset != zero)))    /* the Python path refuses */
        return 0;
    int torch = torch_call(self->n_tensors ? args[self->tensor_pos[0]] : NULL);
    for (int j = 0; j < self->n_tensors; j++)
        if (!view_of(args[self->tensor_pos[j]], torch, &views[j]))
            return 0;
    uint64_t h = key_of(self->n_tensors, torch, views, key, &len);
    Plan *p = *slot_of(self, h, key, len);
    if (!p)
        return 0;
    memcpy(meta, p->words + p->key_len, p->n_meta * 8);
    for (int k = 0; k < p->n_scalars; k++)
        if (!scalar_word(args[self->scalar_pos[k]], p->scalar[k].kind, p->scalar[k].lo,
                         p->scalar[k].hi, &meta[p->scalar[k].slot]))
            return 0;
    if (p->seed_slot >= 0 && (!seed_word(seed, &meta[p->seed_slot])
                              || !seed_word(offset, &meta[p->seed_slot + 1])))
        return 0;
    p->users++;
    int served = serve(self, p, views, out, meta, result);
    if (--p->users == 0 && p->dropped)
        free_plan(p);
    return served;
}

/* fast_call once the plan is found and its scalar and seed words are in `meta`. */
static int serve(Caller *self, Plan *p, const View *views, PyObject *out, int64_t *meta,
                 PyObject **result)
{
    int64_t ptrs[MAX_PTRS];
    PyObject *outs[MAX_OUTS];
    char *in_data[MAX_TENSORS], *out_data[MAX_OUTS];
    for (int j = 0; j < self->n_tensors; j++)
        in_data[j] = views[j].data;

    if (out == Py_None) {
        for (int k = 0; k < self->n_outs; k++) {
            if (p->torch) {
                PyObject *argv[2] = {p->out[k].shape, p->out[k].dtype}, *ptr = NULL;
                outs[k] = PyObject_Vectorcall(torch_empty, argv, 1, kw_dtype);
                if (outs[k] && (ptr = PyObject_CallMethodNoArgs(outs[k], str_data_ptr))) {
                    out_data[k] = (char *)PyLong_AsVoidPtr(ptr);
                    Py_DECREF(ptr);
                }
            } else {
                Py_INCREF(p->out[k].descr);
                outs[k] = PyArray_NewFromDescr(&PyArray_Type, p->out[k].descr, p->out[k].ndim,
                                               p->out[k].dims, NULL, NULL, 0, NULL);
                if (outs[k])
                    out_data[k] = PyArray_BYTES((PyArrayObject *)outs[k]);
            }
            if (!outs[k] || PyErr_Occurred()) {
                for (k += outs[k] != NULL; k--;)
                    Py_DECREF(outs[k]);
                return -1;
            }
        }
    } else {
        PyObject *const *given = &out;
        if (PyTuple_CheckExact(out) || PyList_CheckExact(out)) {
            if (PySequence_Fast_GET_SIZE(out) != self->n_outs)
                return 0;
            given = PySequence_Fast_ITEMS(out);
        } else if (self->n_outs != 1) {
            return 0;
        }
        for (int k = 0; k < self->n_outs; k++) {
            View v;
            if (!(p->torch ? torch_out_fits(given[k], p, k, &v)
                           : numpy_out_fits(given[k], p, k, &v)))
                return 0;
            outs[k] = given[k];
            out_data[k] = v.data;
            /* overlap with an input (other than exactly in place) or another output */
            for (int j = 0; j < self->n_tensors; j++)
                if (out_data[k] < in_data[j] + p->hi[j]
                    && in_data[j] + p->lo[j] < out_data[k] + p->out[k].nbytes
                    && !(in_data[j] == out_data[k] && p->same[j][k]))
                    return 0;
            for (int m = 0; m < k; m++)
                if (out_data[k] < out_data[m] + p->out[m].nbytes
                    && out_data[m] < out_data[k] + p->out[k].nbytes)
                    return 0;
        }
        for (int k = 0; k < self->n_outs; k++)
            Py_INCREF(outs[k]);
    }

    if (p->n) {
        for (int i = 0; i < p->n_ptrs; i++) {
            int src = p->ptr_src[i];
            char *base = src < self->n_tensors ? in_data[src] : out_data[src - self->n_tensors];
            ptrs[i] = (int64_t)(intptr_t)(base + p->ptr_off[i]);
        }
        kernel_fn fn = p->fn;
        int64_t n = p->n;
        if (n >= GIL_FREE_ELEMENTS) {
            Py_BEGIN_ALLOW_THREADS
            fn(ptrs, meta, 0, n);
            Py_END_ALLOW_THREADS
        } else {
            fn(ptrs, meta, 0, n);
        }
    }
    if (self->n_outs == 1) {
        *result = outs[0];
        return 1;
    }
    PyObject *tuple = PyTuple_New(self->n_outs);
    if (!tuple) {
        for (int k = 0; k < self->n_outs; k++)
            Py_DECREF(outs[k]);
        return -1;
    }
    for (int k = 0; k < self->n_outs; k++)
        PyTuple_SET_ITEM(tuple, k, outs[k]);
    *result = tuple;
    return 1;
}

/* A call passing inputs by name: self._call_named(args, {name: value}) binds them. */
static PyObject *call_named(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    PyObject *tuple = PyTuple_New(nargs), *kwargs = PyDict_New(), *result = NULL;
    if (tuple && kwargs) {
        for (Py_ssize_t i = 0; i < nargs; i++) {
            Py_INCREF(args[i]);
            PyTuple_SET_ITEM(tuple, i, args[i]);
        }
        Py_ssize_t i = 0, nk = PyTuple_GET_SIZE(kwnames);
        while (i < nk && !PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]))
            i++;
        if (i == nk)
            result = PyObject_CallMethodObjArgs(op, str_call_named, tuple, kwargs, NULL);
    }
    Py_XDECREF(tuple);
    Py_XDECREF(kwargs);
    return result;
}

static PyObject *Caller_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames)
{
    Caller *self = (Caller *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *out = Py_None, *seed = Py_None, *offset = zero, *result;
    Py_ssize_t nk = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *name = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
        if (name == str_out || !PyUnicode_Compare(name, str_out))
            out = value;
        else if (name == str_seed || !PyUnicode_Compare(name, str_seed))
            seed = value;
        else if (name == str_offset || !PyUnicode_Compare(name, str_offset))
            offset = value;
        else
            return call_named(op, args, nargs, kwnames);
    }
    int served = fast_call(self, args, nargs, out, seed, offset, &result);
    if (served > 0)
        return result;
    if (served < 0)
        return NULL;
    PyObject *tuple = PyTuple_New(nargs);
    if (!tuple)
        return NULL;
    for (Py_ssize_t i = 0; i < nargs; i++) {
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(tuple, i, args[i]);
    }
    result = PyObject_CallMethodObjArgs(op, str_call, tuple, out, seed, offset, NULL);
    Py_DECREF(tuple);
    return result;
}

/* ---- registering plans ---- */

/* Items of a sequence of ints into dst; -1 with an error when not ints, OverflowError when
   more than max (more than the fast path holds: that plan stays with the Python path). */
static Py_ssize_t int_items(PyObject *seq, Py_ssize_t max, int64_t *dst)
{
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of ints");
    if (!fast)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    if (n > max) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_OverflowError, "%zd items, the fast path holds %zd", n, max);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        dst[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
        if (dst[i] == -1 && PyErr_Occurred()) {
            Py_DECREF(fast);
            return -1;
        }
    }
    Py_DECREF(fast);
    return n;
}

/* _remember(arrays, fn, n, ptr_src, ptr_off, meta, scalars, seed_slot, outs, lo, hi, same, keep)
   Serve later calls whose tensor inputs look like `arrays` (shapes, strides, dtypes) as given:
   fn the kernel's address, n its element count; pointer word i is input ptr_src[i] (or output
   ptr_src[i] - n_tensors) plus ptr_off[i] bytes; meta the meta words (scalars and seed zero);
   scalars (slot, kind, lo, hi) flattened, per scalar input; seed_slot -1 if none; outs
   ((shape, dtype, nbytes), ...) with numpy dtypes, or torch dtypes when `arrays` are torch
   tensors (see use_torch); lo, hi per input; same[j * n_outs + k]: input j laid out exactly
   like output k; keep an object to hold while the plan lives. A known key is left as it is.
   Returns whether the fast path serves these arrays (False: too big for it, not exact ndarrays
   or plain torch CPU tensors). */
static PyObject *Caller_remember(Caller *self, PyObject *a)
{
    PyObject *arrays, *ptr_src, *ptr_off, *meta, *scalars, *outs, *lo, *hi, *same, *keep;
    unsigned long long fn;
    long long n;
    int seed_slot;
    int64_t key[MAX_KEY], words[MAX_META], tmp[MAX_TENSORS * MAX_OUTS];
    int64_t out_dims[MAX_OUTS * NPY_MAXDIMS];    /* every output's sizes, one after another */
    Py_ssize_t len;
    if (!PyArg_ParseTuple(a, "O!KLOOOOiO!OOOO", &PyTuple_Type, &arrays, &fn, &n, &ptr_src,
                          &ptr_off, &meta, &scalars, &seed_slot, &PyTuple_Type, &outs, &lo, &hi,
                          &same, &keep))
        return NULL;
    if (self->too_big)
        Py_RETURN_FALSE;
    if (PyTuple_GET_SIZE(arrays) != self->n_tensors || PyTuple_GET_SIZE(outs) != self->n_outs)
        return PyErr_Format(PyExc_ValueError, "plan does not match the signature of %U",
                            self->name);
    View views[MAX_TENSORS];
    PyObject *const *items = &PyTuple_GET_ITEM(arrays, 0);
    int torch = torch_call(self->n_tensors ? items[0] : NULL);
    for (int j = 0; j < self->n_tensors; j++)
        if (!view_of(items[j], torch, &views[j]))
            Py_RETURN_FALSE;
    uint64_t h = key_of(self->n_tensors, torch, views, key, &len);
    if (self->count && *slot_of(self, h, key, len))
        Py_RETURN_TRUE;
    if (self->count >= MAX_PLANS)
        clear_table(self);
    if (2 * (self->count + 1) > self->cap && grow_table(self) < 0)
        return NULL;

    Plan *p = PyMem_Calloc(1, sizeof(Plan));
    if (!p)
        return PyErr_NoMemory();
    p->hash = h;
    p->key_len = len;
    p->fn = (kernel_fn)(uintptr_t)fn;
    p->n = n;
    p->seed_slot = seed_slot;
    p->torch = torch;
    Py_ssize_t n_meta = int_items(meta, MAX_META, words), n_dims = 0;
    Py_ssize_t n_ptrs = n_meta < 0 ? -1 : int_items(ptr_src, MAX_PTRS, tmp);
    if (n_ptrs < 0)
        goto fail;
    for (Py_ssize_t i = 0; i < n_ptrs; i++)
        p->ptr_src[i] = (int16_t)tmp[i];
    if (int_items(ptr_off, MAX_PTRS, p->ptr_off) != n_ptrs) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "ptr_src and ptr_off differ in length");
        goto fail;
    }
    p->n_ptrs = (int)n_ptrs;
    p->n_meta = (int)n_meta;
    Py_ssize_t n_sc = int_items(scalars, 4 * MAX_SCALARS, tmp);
    if (n_sc < 0)
        goto fail;
    if (n_sc != 4 * self->n_scalars) {
        PyErr_SetString(PyExc_ValueError, "scalars: four words per scalar input");
        goto fail;
    }
    p->n_scalars = self->n_scalars;
    for (int k = 0; k < self->n_scalars; k++) {
        p->scalar[k].slot = (int)tmp[4 * k];
        p->scalar[k].kind = (int)tmp[4 * k + 1];
        p->scalar[k].lo = tmp[4 * k + 2];
        p->scalar[k].hi = tmp[4 * k + 3];
    }
    if (int_items(lo, MAX_TENSORS, p->lo) != self->n_tensors
        || int_items(hi, MAX_TENSORS, p->hi) != self->n_tensors
        || int_items(same, MAX_TENSORS * MAX_OUTS, tmp) != self->n_tensors * self->n_outs) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "lo, hi, same: one item per input (and output)");
        goto fail;
    }
    for (int j = 0; j < self->n_tensors; j++)
        for (int k = 0; k < self->n_outs; k++)
            p->same[j][k] = tmp[j * self->n_outs + k] != 0;
    for (int k = 0; k < self->n_outs; k++) {
        PyObject *shape, *dtype;
        long long nbytes;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(outs, k), "O!OL", &PyTuple_Type, &shape, &dtype,
                              &nbytes)
            || (!torch && !PyArray_DescrConverter(dtype, &p->out[k].descr)))
            goto fail;
        Py_ssize_t nd = int_items(shape, torch ? TORCH_MAXDIMS : NPY_MAXDIMS, out_dims + n_dims);
        if (nd < 0)
            goto fail;
        if (torch) {
            Py_INCREF(shape);
            Py_INCREF(dtype);
            p->out[k].shape = shape;
            p->out[k].dtype = dtype;
        }
        p->out[k].ndim = (int)nd;
        p->out[k].nbytes = nbytes;
        n_dims += nd;
    }
    p->words = PyMem_Malloc((len + n_meta + n_dims + 1) * 8);
    if (!p->words) {
        PyErr_NoMemory();
        goto fail;
    }
    memcpy(p->words, key, len * 8);
    memcpy(p->words + len, words, n_meta * 8);
    memcpy(p->words + len + n_meta, out_dims, n_dims * 8);      /* npy_intp is int64 here */
    npy_intp *dims = (npy_intp *)(p->words + len + n_meta);
    for (int k = 0; k < self->n_outs; k++) {
        p->out[k].dims = dims;
        dims += p->out[k].ndim;
    }
    Py_INCREF(keep);
    p->keep = keep;
    *slot_of(self, h, key, len) = p;
    self->count++;
    Py_RETURN_TRUE;
fail:
    free_plan(p);
    if (!PyErr_ExceptionMatches(PyExc_OverflowError))
        return NULL;
    PyErr_Clear();
    Py_RETURN_FALSE;
}

static PyObject *Caller_forget(Caller *self, PyObject *unused)
{
    clear_table(self);
    Py_RETURN_NONE;
}

static PyObject *Caller_plans(Caller *self, void *unused)
{
    return PyLong_FromSsize_t(self->count);
}

/* Caller(name, n_args, tensor_positions, scalar_positions, n_outs, random) */
static int Caller_init(Caller *self, PyObject *args, PyObject *kwds)
{
    PyObject *name, *tensor_pos, *scalar_pos;
    int64_t tmp[MAX_TENSORS];
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "UiOOip", &name, &self->n_args, &tensor_pos, &scalar_pos,
                          &self->n_outs, &self->random))
        return -1;
    self->too_big = self->n_outs > MAX_OUTS;
    if (!self->too_big) {
        if ((n = int_items(tensor_pos, MAX_TENSORS, tmp)) >= 0) {
            self->n_tensors = (int)n;
            for (Py_ssize_t j = 0; j < n; j++)
                self->tensor_pos[j] = (int)tmp[j];
            n = int_items(scalar_pos, MAX_SCALARS, tmp);
            self->n_scalars = n < 0 ? 0 : (int)n;
            for (Py_ssize_t k = 0; k < n; k++)
                self->scalar_pos[k] = (int)tmp[k];
        }
        if (n < 0) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError))
                return -1;
            PyErr_Clear();
            self->too_big = 1;
        }
    }
    Py_INCREF(name);
    Py_XSETREF(self->name, name);
    clear_table(self);
    self->vectorcall = Caller_vectorcall;
    /* Python 3.12 lets a subclass that keeps tp_call inherit vectorcall: do the same on 3.10
       and 3.11. */
    PyTypeObject *tp = Py_TYPE(self);
    if (tp->tp_call == PyVectorcall_Call)
        tp->tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL;
    return 0;
}

static void Caller_dealloc(Caller *self)
{
    clear_table(self);
    Py_CLEAR(self->name);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef Caller_methods[] = {
    {"_remember", (PyCFunction)Caller_remember, METH_VARARGS,
     "Serve later calls with arrays like these by a plan (see _dispatch.c)."},
    {"_forget", (PyCFunction)Caller_forget, METH_NOARGS, "Drop every plan."},
    {NULL},
};

static PyGetSetDef Caller_getset[] = {
    {"_fast_plans", (getter)Caller_plans, NULL, "Plans the C fast path holds.", NULL},
    {NULL},
};

static PyTypeObject CallerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fusebuild.runtime._dispatch.Caller",
    .tp_doc = "Base of GroupCaller: the C fast path of a group call (see _dispatch.c).",
    .tp_basicsize = sizeof(Caller),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Caller, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Caller_init,
    .tp_dealloc = (destructor)Caller_dealloc,
    .tp_methods = Caller_methods,
    .tp_getset = Caller_getset,
};

/* use_torch(Tensor, empty, is_grad_enabled): serve torch CPU tensors too (torch.Tensor,
   torch.empty, torch.is_grad_enabled). */
static PyObject *use_torch(PyObject *module, PyObject *args)
{
    PyObject *tensor, *empty, *grad_enabled;
    if (!PyArg_ParseTuple(args, "O!OO", &PyType_Type, &tensor, &empty, &grad_enabled))
        return NULL;
    Py_INCREF(tensor);
    Py_INCREF(empty);
    Py_INCREF(grad_enabled);
    Py_XSETREF(torch_tensor, (PyTypeObject *)tensor);
    Py_XSETREF(torch_empty, empty);
    Py_XSETREF(torch_grad_enabled, grad_enabled);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"use_torch", use_torch, METH_VARARGS,
     "Serve torch CPU tensors too: use_torch(torch.Tensor, torch.empty, "
     "torch.is_grad_enabled)."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_dispatch", "The C fast path of CPU group calls.", -1, module_methods,
};

PyMODINIT_FUNC PyInit__dispatch(void)
{
    import_array();
    if (PyType_Ready(&CallerType) < 0)
        return NULL;
    str_out = PyUnicode_InternFromString("out");
    str_seed = PyUnicode_InternFromString("seed");
    str_offset = PyUnicode_InternFromString("offset");
    str_call = PyUnicode_InternFromString("_call");
    str_call_named = PyUnicode_InternFromString("_call_named");
    str_requires_grad = PyUnicode_InternFromString("requires_grad");
    zero = PyLong_FromLong(0);
    str_is_cpu = PyUnicode_InternFromString("is_cpu");
    str_is_neg = PyUnicode_InternFromString("is_neg");
    str_shape = PyUnicode_InternFromString("shape");
    str_stride = PyUnicode_InternFromString("stride");
    str_dtype = PyUnicode_InternFromString("dtype");
    str_data_ptr = PyUnicode_InternFromString("data_ptr");
    kw_dtype = str_dtype ? PyTuple_Pack(1, str_dtype) : NULL;
    if (!str_out || !str_seed || !str_offset || !str_call || !str_call_named || !zero
        || !str_is_cpu || !str_is_neg || !str_shape || !str_stride || !str_data_ptr
        || !str_requires_grad || !kw_dtype)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    Py_INCREF(&CallerType);
    if (PyModule_AddObject(m, "Caller", (PyObject *)&CallerType) < 0) {
        Py_DECREF(&CallerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
