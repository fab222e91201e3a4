/* Fused transition-aware neighbor attention (forward and backward) for CPUs.
 *
 * The math is in model/tga_layer.py. Layout: qkv [BN, 3D] rows (q | k | v, heads are consecutive
 * blocks of dh = D/H), nbr/et [BN, 3] global predecessor rows and transition types (-1 = none),
 * R/R2 [T, D] type vectors for scores/messages, the self edge is slot 3 with type T-1.
 * One pass per node instead of ~20 tensor ops: nothing of size [BN, 4, D] is ever materialized.
 *
 * Threads: the forward splits nodes; the backward scatters into predecessors, which lie in the
 * node's own sequence (blocks of N rows), so it splits whole sequences: no two threads write a row.
 * Built at first use by model/fused.py (gcc -O3 -fopenmp); no torch headers, called via ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define MAX_DH 256

#define DEFINE_KERNELS(T_, SFX)                                                                          \
static inline T_ dot2_##SFX(const T_* restrict a, const T_* restrict b, const T_* restrict c, int64_t n) { \
  T_ acc = 0;                                                                                            \
  for (int64_t e = 0; e < n; ++e) acc += a[e] * (b[e] + c[e]);                                           \
  return acc;                                                                                            \
}                                                                                                        \
static inline void axpy_##SFX(T_* restrict y, const T_* restrict x, T_ a, int64_t n) {                   \
  for (int64_t e = 0; e < n; ++e) y[e] += a * x[e];                                                      \
}                                                                                                        \
static inline void axpy2_##SFX(T_* restrict y, const T_* restrict x, const T_* restrict z, T_ a, int64_t n) { \
  for (int64_t e = 0; e < n; ++e) y[e] += a * (x[e] + z[e]);                                             \
}                                                                                                        \
void tga_forward_##SFX(const T_* qkv, const int64_t* nbr, const int64_t* et, const T_* R, const T_* R2,  \
                       T_* out, T_* attn, int64_t BN, int64_t D, int64_t H, int64_t T, int nthreads) {   \
  const int64_t dh = D / H, S = 3 * D;                                                                   \
  const T_ scale = (T_)1 / sqrt((double)dh);                                                             \
  _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                                     \
  for (int64_t j = 0; j < BN; ++j) {                                                                     \
    int64_t src[4], ty[4];                                                                               \
    for (int c = 0; c < 3; ++c) { src[c] = nbr[j * 3 + c]; ty[c] = et[j * 3 + c]; }                      \
    src[3] = j; ty[3] = T - 1;                                                                           \
    const T_* q = qkv + j * S;                                                                           \
    T_* o = out + j * D;                                                                                 \
    memset(o, 0, sizeof(T_) * D);                                                                        \
    for (int64_t h = 0; h < H; ++h) {                                                                    \
      const int64_t off = h * dh;                                                                        \
      T_ s[4], mx = -INFINITY, z = 0;                                                                    \
      for (int c = 0; c < 4; ++c) {                                                                      \
        if (src[c] < 0) { s[c] = -INFINITY; continue; }                                                  \
        s[c] = dot2_##SFX(q + off, qkv + src[c] * S + D + off, R + ty[c] * D + off, dh) * scale;         \
        if (s[c] > mx) mx = s[c];                                                                        \
      }                                                                                                  \
      for (int c = 0; c < 4; ++c) { s[c] = src[c] < 0 ? (T_)0 : (T_)exp((double)(s[c] - mx)); z += s[c]; } \
      T_* a = attn + (j * H + h) * 4;                                                                    \
      for (int c = 0; c < 4; ++c) {                                                                      \
        a[c] = s[c] / z;                                                                                 \
        if (src[c] >= 0) axpy2_##SFX(o + off, qkv + src[c] * S + 2 * D + off, R2 + ty[c] * D + off, a[c], dh); \
      }                                                                                                  \
    }                                                                                                    \
  }                                                                                                      \
}                                                                                                        \
void tga_backward_##SFX(const T_* dout, const T_* qkv, const int64_t* nbr, const int64_t* et, const T_* R, \
                        const T_* R2, const T_* attn, T_* dqkv, T_* dR, T_* dR2, int64_t BN, int64_t N,   \
                        int64_t D, int64_t H, int64_t T, int nthreads) {                                 \
  const int64_t dh = D / H, S = 3 * D, B = BN / N;                                                       \
  const T_ scale = (T_)1 / sqrt((double)dh);                                                             \
  T_* acc = (T_*)calloc((size_t)nthreads * 2 * T * D, sizeof(T_));                                       \
  _Pragma("omp parallel num_threads(nthreads)")                                                          \
  {                                                                                                      \
    T_* lR = acc + (size_t)omp_get_thread_num() * 2 * T * D;                                             \
    T_* lR2 = lR + T * D;                                                                                \
    T_ dq[MAX_DH];                                                                                       \
    _Pragma("omp for schedule(static)")                                                                  \
    for (int64_t b = 0; b < B; ++b) {                                                                    \
      for (int64_t j = b * N; j < (b + 1) * N; ++j) {                                                    \
        int64_t src[4], ty[4];                                                                           \
        for (int c = 0; c < 3; ++c) { src[c] = nbr[j * 3 + c]; ty[c] = et[j * 3 + c]; }                  \
        src[3] = j; ty[3] = T - 1;                                                                       \
        const T_* q = qkv + j * S;                                                                       \
        const T_* g = dout + j * D;                                                                      \
        for (int64_t h = 0; h < H; ++h) {                                                                \
          const int64_t off = h * dh;                                                                    \
          const T_* a = attn + (j * H + h) * 4;                                                          \
          T_ da[4], sum = 0;                                                                             \
          for (int c = 0; c < 4; ++c) {                                                                  \
            if (src[c] < 0) { da[c] = 0; continue; }                                                     \
            da[c] = dot2_##SFX(g + off, qkv + src[c] * S + 2 * D + off, R2 + ty[c] * D + off, dh);       \
            sum += a[c] * da[c];                                                                         \
          }                                                                                              \
          memset(dq, 0, sizeof(T_) * dh);                                                                \
          for (int c = 0; c < 4; ++c) {                                                                  \
            if (src[c] < 0) continue;                                                                    \
            const T_ ds = a[c] * (da[c] - sum) * scale;                                                  \
            axpy_##SFX(dqkv + src[c] * S + 2 * D + off, g + off, a[c], dh);                              \
            axpy_##SFX(lR2 + ty[c] * D + off, g + off, a[c], dh);                                        \
            axpy2_##SFX(dq, qkv + src[c] * S + D + off, R + ty[c] * D + off, ds, dh);                    \
            axpy_##SFX(dqkv + src[c] * S + D + off, q + off, ds, dh);                                    \
            axpy_##SFX(lR + ty[c] * D + off, q + off, ds, dh);                                           \
          }                                                                                              \
          axpy_##SFX(dqkv + j * S + off, dq, (T_)1, dh);                                                 \
        }                                                                                                \
      }                                                                                                  \
    }                                                                                                    \
  }                                                                                                      \
  for (int t = 0; t < nthreads; ++t) {                                                                   \
    const T_* l = acc + (size_t)t * 2 * T * D;                                                           \
    for (int64_t x = 0; x < T * D; ++x) { dR[x] += l[x]; dR2[x] += l[T * D + x]; }                       \
  }                                                                                                      \
  free(acc);                                                                                             \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
