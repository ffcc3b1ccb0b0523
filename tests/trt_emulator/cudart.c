/* A libcudart STAND-IN for the TensorRT emulator (tests only; no GPU, no CUDA).
 *
 * It exports the CUDA runtime calls edgeres's runners make (directly through ctypes or through Polygraphy's
 * ctypes wrapper) with the real names and signatures; "device" memory is host memory, streams and events are
 * host objects, and stream capture records the copies and host functions enqueued on a stream so that a
 * CUDA graph launch replays them. The emulated TensorRT enqueues its work with cudaLaunchHostFunc, as any
 * stream-ordered host work is enqueued in CUDA. Device name and compute capability come from the environment
 * (EDGERES_EMULATED_GPU, EDGERES_EMULATED_CC "major.minor"). Built by tests/trt_emulator with the C compiler
 * NNCF already requires.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int cudaError_t;
typedef void (*host_fn)(void *);

enum { OP_COPY = 1, OP_HOST = 2 };
typedef struct { int kind; void *dst; const void *src; size_t n; host_fn fn; void *data; } op_t;
typedef struct { op_t *ops; int n, cap; } oplist_t;
typedef struct { int capturing; oplist_t rec; } stream_t;
typedef struct { double t; } event_t;

static void push(oplist_t *l, op_t op) {
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 8;
        l->ops = realloc(l->ops, sizeof(op_t) * l->cap);
    }
    l->ops[l->n++] = op;
}

static void run_op(const op_t *op) {
    if (op->kind == OP_COPY) memcpy(op->dst, op->src, op->n);
    else op->fn(op->data);
}

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void cc(int *major, int *minor) {
    const char *s = getenv("EDGERES_EMULATED_CC");
    *major = 8; *minor = 6;
    if (s && *s) { *major = atoi(s); const char *dot = strchr(s, '.'); *minor = dot ? atoi(dot + 1) : 0; }
}

cudaError_t cudaGetDeviceCount(int *count) { *count = 1; return 0; }
cudaError_t cudaSetDevice(int dev) { return dev == 0 ? 0 : 101; }
cudaError_t cudaGetDevice(int *dev) { *dev = 0; return 0; }
cudaError_t cudaRuntimeGetVersion(int *v) { *v = 13000; return 0; }
cudaError_t cudaDriverGetVersion(int *v) { *v = 13000; return 0; }
const char *cudaGetErrorString(cudaError_t e) { return e ? "emulated CUDA error" : "no error"; }
cudaError_t cudaGetLastError(void) { return 0; }

cudaError_t cudaDeviceGetAttribute(int *value, int attr, int dev) {
    int major, minor;
    if (dev != 0) return 101;   /* cudaErrorInvalidDevice */
    cc(&major, &minor);
    if (attr == 75) *value = major;        /* cudaDevAttrComputeCapabilityMajor */
    else if (attr == 76) *value = minor;   /* cudaDevAttrComputeCapabilityMinor */
    else *value = 0;
    return 0;
}

static cudaError_t props(void *p, int dev) {
    const char *name = getenv("EDGERES_EMULATED_GPU");
    if (dev != 0) return 101;
    memset(p, 0, 256);   /* cudaDeviceProp starts with char name[256] */
    strncpy((char *)p, name && *name ? name : "edgeres emulated GPU (libcudart stand-in)", 255);
    return 0;
}
cudaError_t cudaGetDeviceProperties(void *p, int dev) { return props(p, dev); }
cudaError_t cudaGetDeviceProperties_v2(void *p, int dev) { return props(p, dev); }

cudaError_t cudaMalloc(void **ptr, size_t n) { *ptr = calloc(1, n ? n : 1); return *ptr ? 0 : 2; }
cudaError_t cudaMallocHost(void **ptr, size_t n) { return cudaMalloc(ptr, n); }
cudaError_t cudaFree(void *ptr) { free(ptr); return 0; }
cudaError_t cudaFreeHost(void *ptr) { free(ptr); return 0; }

cudaError_t cudaMemcpy(void *dst, const void *src, size_t n, int kind) { (void)kind; memcpy(dst, src, n); return 0; }

cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t n, int kind, stream_t *s) {
    op_t op = {OP_COPY, dst, src, n, NULL, NULL};
    (void)kind;
    if (s && s->capturing) push(&s->rec, op); else run_op(&op);
    return 0;
}

cudaError_t cudaLaunchHostFunc(stream_t *s, host_fn fn, void *data) {
    op_t op = {OP_HOST, NULL, NULL, 0, fn, data};
    if (s && s->capturing) push(&s->rec, op); else run_op(&op);
    return 0;
}

cudaError_t cudaStreamCreate(stream_t **s) { *s = calloc(1, sizeof(stream_t)); return *s ? 0 : 2; }
cudaError_t cudaStreamCreateWithFlags(stream_t **s, unsigned flags) { (void)flags; return cudaStreamCreate(s); }
cudaError_t cudaStreamDestroy(stream_t *s) { if (s) { free(s->rec.ops); free(s); } return 0; }
cudaError_t cudaStreamSynchronize(stream_t *s) { (void)s; return 0; }
cudaError_t cudaDeviceSynchronize(void) { return 0; }

cudaError_t cudaStreamBeginCapture(stream_t *s, int mode) {
    (void)mode;
    if (!s) return 900;   /* capturing the legacy default stream is not permitted */
    s->capturing = 1; s->rec.n = 0;
    return 0;
}

cudaError_t cudaStreamEndCapture(stream_t *s, oplist_t **graph) {
    oplist_t *g;
    if (!s || !s->capturing) return 901;
    g = calloc(1, sizeof(oplist_t));
    *g = s->rec;
    memset(&s->rec, 0, sizeof(oplist_t));
    s->capturing = 0;
    *graph = g;
    return 0;
}

cudaError_t cudaGraphInstantiateWithFlags(oplist_t **exec, oplist_t *graph, unsigned long long flags) {
    oplist_t *e = calloc(1, sizeof(oplist_t));
    (void)flags;
    e->n = e->cap = graph->n;
    e->ops = malloc(sizeof(op_t) * (graph->n ? graph->n : 1));
    memcpy(e->ops, graph->ops, sizeof(op_t) * graph->n);
    *exec = e;
    return 0;
}

cudaError_t cudaGraphLaunch(oplist_t *exec, stream_t *s) {
    int i;
    if (s && s->capturing) { for (i = 0; i < exec->n; i++) push(&s->rec, exec->ops[i]); return 0; }
    for (i = 0; i < exec->n; i++) run_op(&exec->ops[i]);
    return 0;
}

cudaError_t cudaGraphDestroy(oplist_t *g) { if (g) { free(g->ops); free(g); } return 0; }
cudaError_t cudaGraphExecDestroy(oplist_t *g) { return cudaGraphDestroy(g); }

cudaError_t cudaEventCreate(event_t **e) { *e = calloc(1, sizeof(event_t)); return *e ? 0 : 2; }
cudaError_t cudaEventCreateWithFlags(event_t **e, unsigned flags) { (void)flags; return cudaEventCreate(e); }
cudaError_t cudaEventRecord(event_t *e, stream_t *s) { (void)s; e->t = now_ms(); return 0; }
cudaError_t cudaEventSynchronize(event_t *e) { (void)e; return 0; }
cudaError_t cudaEventElapsedTime(float *ms, event_t *a, event_t *b) { *ms = (float)(b->t - a->t); return 0; }
cudaError_t cudaEventDestroy(event_t *e) { free(e); return 0; }
