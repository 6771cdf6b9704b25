/* y = x Wᵀ for a few rows of x (a decode step's batch) and a plain row-major fp32 weight W (N x K).
 *
 * A decode step multiplies 1-8 rows by every weight of the model once: the work is reading W from
 * memory, 8 multiply-adds per weight at most. GEMM kernels tuned for big products read it at a third
 * of the memory bandwidth here (engines/small_linear.py has the figures); this reads each row of W
 * once, straight from its plain layout, with 8 accumulators in registers (one weight row against 8
 * input rows) and a software prefetch a few rows ahead, the rows split across OpenMP threads (the
 * runtime PyTorch itself loaded, so its thread pool). Built by engines/small_linear.py with
 * -O3 -mavx2 -mfma for x86-64 CPUs that have AVX2 and FMA.
 *
 * Where the CPU has AVX-512 (asked at run time: `sf_small_linear_wide`), a second path reads 16 floats
 * a load and takes two weight rows at a time against the input rows (2R accumulators of 32 registers),
 * so each input load feeds two multiply-adds: 1.13-1.27x the AVX2 path for 1-8 rows on the AVX-512
 * machine measured (docs/benchmarks.md). Its functions alone are compiled for AVX-512 (`target`
 * attribute); the caller picks the path (`wide`, opt-in), and only a CPU that has it is ever asked to run it. */
#include <immintrin.h>
#include <omp.h>

#define PREFETCH 2048 /* floats ahead in the weight stream */

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

/* one weight row against R input rows (R = 4 or 8, a constant once inlined):
 * y[m * ldy] = x_m . w for m < R, R accumulators in registers */
static inline __attribute__((always_inline)) void row_by(const int R, const float *x, long ldx, const float *w,
                                                         long K, float *y, long ldy) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    long k = 0;
    for (; k + 8 <= K; k += 8) {
        _mm_prefetch((const char *)(w + k + PREFETCH), _MM_HINT_T0);
        __m256 v = _mm256_loadu_ps(w + k);
        a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + ldx + k), a1);
        a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 2 * ldx + k), a2);
        a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 3 * ldx + k), a3);
        if (R == 8) {
            a4 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 4 * ldx + k), a4);
            a5 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 5 * ldx + k), a5);
            a6 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 6 * ldx + k), a6);
            a7 = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + 7 * ldx + k), a7);
        }
    }
    float s[8] = {hsum(a0), hsum(a1), hsum(a2), hsum(a3), hsum(a4), hsum(a5), hsum(a6), hsum(a7)};
    for (int m = 0; m < R; m++) {
        for (long j = k; j < K; j++) s[m] += w[j] * x[m * ldx + j];
        y[m * ldy] = s[m];
    }
}

/* one weight row against one input row */
static float dot(const float *x, const float *w, long K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        _mm_prefetch((const char *)(w + k + PREFETCH), _MM_HINT_T0);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    float s = hsum(_mm256_add_ps(a0, a1));
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

static void rows(const float *x, long M, long ldx, const float *w, long N, long K, float *y, long n0, long n1) {
    for (long n = n0; n < n1; n++) {
        const float *row = w + n * K;
        long m = 0;
        for (; m + 8 <= M; m += 8) row_by(8, x + m * ldx, ldx, row, K, y + m * N + n, N);
        if (m + 4 <= M) {
            row_by(4, x + m * ldx, ldx, row, K, y + m * N + n, N);
            m += 4;
        }
        for (; m < M; m++) y[m * N + n] = dot(x + m * ldx, row, K);
    }
}

/* ------------------------------------------------------------------ AVX-512: 16 floats a load */
#define WIDE_TARGET __attribute__((target("avx512f")))

/* J weight rows (J = 1 or 2) against R input rows (R = 1, 2, 4 or 8), constants once inlined:
 * y[m * ldy + j] = x_m . w_j, J*R accumulators in registers, a masked load for the last K % 16 */
static inline __attribute__((always_inline)) WIDE_TARGET void rows_by_wide(const int J, const int R, const float *x,
                                                                        long ldx, const float *w, long K, float *y,
                                                                        long ldy) {
    __m512 a[16];
    for (int i = 0; i < J * R; i++) a[i] = _mm512_setzero_ps();
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 v[2];
        for (int j = 0; j < J; j++) {
            _mm_prefetch((const char *)(w + j * K + k + PREFETCH), _MM_HINT_T0);
            v[j] = _mm512_loadu_ps(w + j * K + k);
        }
        for (int m = 0; m < R; m++) {
            __m512 u = _mm512_loadu_ps(x + m * ldx + k);
            for (int j = 0; j < J; j++) a[j * R + m] = _mm512_fmadd_ps(v[j], u, a[j * R + m]);
        }
    }
    if (k < K) {
        __mmask16 tail = (__mmask16)((1u << (K - k)) - 1);
        __m512 v[2];
        for (int j = 0; j < J; j++) v[j] = _mm512_maskz_loadu_ps(tail, w + j * K + k);
        for (int m = 0; m < R; m++) {
            __m512 u = _mm512_maskz_loadu_ps(tail, x + m * ldx + k);
            for (int j = 0; j < J; j++) a[j * R + m] = _mm512_fmadd_ps(v[j], u, a[j * R + m]);
        }
    }
    for (int m = 0; m < R; m++)
        for (int j = 0; j < J; j++) y[m * ldy + j] = _mm512_reduce_add_ps(a[j * R + m]);
}

/* weight rows n0..n1 against every input row, J at a time */
#define WIDE_ROWS(J)                                                                                   \
    do {                                                                                               \
        long m = 0;                                                                                    \
        for (; m + 8 <= M; m += 8) rows_by_wide(J, 8, x + m * ldx, ldx, w + n * K, K, y + m * N + n, N); \
        if (m + 4 <= M) { rows_by_wide(J, 4, x + m * ldx, ldx, w + n * K, K, y + m * N + n, N); m += 4; } \
        if (m + 2 <= M) { rows_by_wide(J, 2, x + m * ldx, ldx, w + n * K, K, y + m * N + n, N); m += 2; } \
        if (m < M) rows_by_wide(J, 1, x + m * ldx, ldx, w + n * K, K, y + m * N + n, N);               \
    } while (0)

WIDE_TARGET static void rows_wide(const float *x, long M, long ldx, const float *w, long N, long K, float *y,
                                  long n0, long n1) {
    long n = n0;
    for (; n + 2 <= n1; n += 2) WIDE_ROWS(2);
    for (; n < n1; n++) WIDE_ROWS(1);
}

/* whether this CPU (and its operating system) runs the AVX-512 path */
int sf_small_linear_wide(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

/* y (M x N, contiguous) = x (M x K, rows `ldx` apart) @ w (N x K, contiguous)ᵀ, on up to `threads` threads;
 * `wide`: the AVX-512 path (only where sf_small_linear_wide says so) */
void sf_small_linear(const float *x, long M, long ldx, const float *w, long N, long K, float *y, int threads,
                     int wide) {
    void (*block)(const float *, long, long, const float *, long, long, float *, long, long) = wide ? rows_wide : rows;
    if (threads > 1 && N >= 2 * threads && N * K >= 65536) {
        long per = (N + threads - 1) / threads;
        #pragma omp parallel num_threads(threads)
        {
            long t = omp_get_thread_num();
            long n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
            if (n0 < n1) block(x, M, ldx, w, N, K, y, n0, n1);
        }
    } else {
        block(x, M, ldx, w, N, K, y, 0, N);
    }
}
