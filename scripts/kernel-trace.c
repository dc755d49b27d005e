// A kernel timeline of any CUDA process, without Nsight: a CUPTI injection library.
//
// Where a step's time goes when the ops' isolated timings (`bench ops`) do not add up to the step: the
// device idle between kernels (the host not keeping up, or a synchronisation) against the kernels' own time.
//
// Build on any machine (CUPTI's headers and library come in the nvidia-cuda-cupti wheel, CUDA 13.0; cuda.h from
// ../shared/tools/cuda-env.sh's CUDA_HOME):
//   pip download --no-deps nvidia-cuda-cupti==13.0.85 -d /tmp/cupti && (cd /tmp/cupti && unzip -q *.whl)
//   CUPTI=/tmp/cupti/nvidia/cu13
//   gcc -O2 -shared -fPIC -I$CUPTI/include -I$CUDA_HOME/include -o libktrace.so scripts/kernel-trace.c
//       $CUPTI/lib/libcupti.so.13           (one line)
// Use, with libktrace.so and libcupti.so.13 side by side in DIR (the driver loads the library and calls
// InitializeInjection before the first CUDA call; KTRACE_DRIVER=1 also records every driver call):
//   CUDA_INJECTION64_PATH=DIR/libktrace.so LD_LIBRARY_PATH=DIR:$LD_LIBRARY_PATH KTRACE_OUT=trace.bin
//       lorahost bench train --shape qwen-14b --device cuda:0 --dtype bf16 --seq 2048 --steps 3   (one line)
// Then: python3 scripts/kernel-trace.py trace.bin (numpy).
//
// The file: "KTR1", u32 record count, records of {u64 start, u64 end, u32 name index, u32 correlation,
// u32 kind (0 kernel, 1 memcpy, 2 memset, 3 driver call), u32 cbid}, then u32 name count and the names, each
// u32 length + bytes. Timestamps are CUPTI's (ns, one clock for device and host records).
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint64_t start, end; uint32_t name, corr, kind, cbid; } Rec;

static Rec *recs;
static size_t n_recs, cap_recs;
static const char **names;
static size_t n_names, cap_names;

// Kernel names are CUPTI-owned strings that live as long as the process: interned by pointer.
#define SLOTS (1u << 16)
static const char *slot_key[SLOTS];
static uint32_t slot_val[SLOTS];

static uint32_t intern(const char *s) {
    if (!s) s = "?";
    uint32_t h = (uint32_t)(((uintptr_t)s >> 4) * 2654435761u) & (SLOTS - 1);
    while (slot_key[h] && slot_key[h] != s) h = (h + 1) & (SLOTS - 1);
    if (!slot_key[h]) {
        if (n_names == cap_names) {
            cap_names = cap_names ? cap_names * 2 : 1024;
            names = realloc(names, cap_names * sizeof *names);
        }
        slot_key[h] = s;
        slot_val[h] = (uint32_t)n_names;
        names[n_names++] = s;
    }
    return slot_val[h];
}

static void push(uint64_t start, uint64_t end, uint32_t name, uint32_t corr, uint32_t kind, uint32_t cbid) {
    if (n_recs == cap_recs) {
        cap_recs = cap_recs ? cap_recs * 2 : (1u << 20);
        recs = realloc(recs, cap_recs * sizeof *recs);
        if (!recs) { fprintf(stderr, "ktrace: out of memory\n"); exit(1); }
    }
    recs[n_recs++] = (Rec){start, end, name, corr, kind, cbid};
}

#define BUF (8u << 20)

static void CUPTIAPI requested(uint8_t **buffer, size_t *size, size_t *max_records) {
    *buffer = aligned_alloc(8, BUF);
    *size = BUF;
    *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buffer, size_t size, size_t valid) {
    (void)ctx; (void)stream; (void)size;
    CUpti_Activity *r = NULL;
    while (cuptiActivityGetNextRecord(buffer, valid, &r) == CUPTI_SUCCESS) {
        switch (r->kind) {
        case CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL:
        case CUPTI_ACTIVITY_KIND_KERNEL: {
            CUpti_ActivityKernel10 *k = (CUpti_ActivityKernel10 *)r;
            push(k->start, k->end, intern(k->name), k->correlationId, 0, 0);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMCPY: {
            CUpti_ActivityMemcpy6 *m = (CUpti_ActivityMemcpy6 *)r;
            push(m->start, m->end, intern("[memcpy]"), m->correlationId, 1, m->copyKind);
            break;
        }
        case CUPTI_ACTIVITY_KIND_MEMSET: {
            CUpti_ActivityMemset4 *m = (CUpti_ActivityMemset4 *)r;
            push(m->start, m->end, intern("[memset]"), m->correlationId, 2, 0);
            break;
        }
        case CUPTI_ACTIVITY_KIND_DRIVER: {
            CUpti_ActivityAPI *a = (CUpti_ActivityAPI *)r;
            push(a->start, a->end, intern("[driver]"), a->correlationId, 3, a->cbid);
            break;
        }
        default: break;
        }
    }
    free(buffer);
}

static void write_out(void) {
    cuptiActivityFlushAll(1);
    const char *path = getenv("KTRACE_OUT");
    if (!path) path = "ktrace.bin";
    FILE *f = fopen(path, "wb");
    if (!f) { fprintf(stderr, "ktrace: cannot write %s\n", path); return; }
    uint32_t n = (uint32_t)n_recs, m = (uint32_t)n_names;
    fwrite("KTR1", 1, 4, f);
    fwrite(&n, 4, 1, f);
    fwrite(recs, sizeof *recs, n_recs, f);
    fwrite(&m, 4, 1, f);
    for (size_t i = 0; i < n_names; i++) {
        uint32_t len = (uint32_t)strlen(names[i]);
        fwrite(&len, 4, 1, f);
        fwrite(names[i], 1, len, f);
    }
    fclose(f);
    fprintf(stderr, "ktrace: %u records, %u names -> %s\n", n, m, path);
}

#define CHECK(call) do { CUptiResult e = (call); if (e != CUPTI_SUCCESS) { \
    const char *s; cuptiGetResultString(e, &s); fprintf(stderr, "ktrace: %s: %s\n", #call, s); return 1; } } while (0)

int InitializeInjection(void) {
    CHECK(cuptiActivityRegisterCallbacks(requested, completed));
    CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL));
    CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMCPY));
    CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_MEMSET));
    const char *drv = getenv("KTRACE_DRIVER");
    if (drv && *drv && *drv != '0') CHECK(cuptiActivityEnable(CUPTI_ACTIVITY_KIND_DRIVER));
    atexit(write_out);
    return 1;
}
