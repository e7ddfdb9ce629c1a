// Fused per-step elementwise work of the LSTM / HyperLSTM fused paths (hypernetworks/nn/_fused.py).
//
// Plain C ABI over raw pointers, loaded with ctypes: no torch or Python headers, so the build
// takes about a second instead of the ~1 minute of a torch C++ extension. Every function works on
// one time step of a batch, single-threaded (the matrix products around it use torch's threads),
// with loops over units that the compiler vectorises (-O3 -march=native -fopenmp-simd; no OpenMP
// runtime). Layouts are row-major; gate order i, g, f, o; "stride" is the distance between rows.
//
// exp and tanh are the vectorisable Cephes-style ones below, for float (a few ulp, like torch's float32 ones) and
// double (about 1 ulp: float64 results agree with the PyTorch reference path to ~1e-15).
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

inline float exp_fast(float x) {
    // Cephes expf: exp(x) = 2^n * exp(r), |r| <= ln2/2, degree-7 polynomial.
    x = x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x);  // (fmin/fmax would block vectorisation)
    // n = round(x / ln2) by the 1.5 * 2^23 trick (std::floor does not vectorise with gcc 12 here).
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
    return p * scale;
}

inline float tanh_fast(float x) {
    const float ax = std::fabs(x);
    // |x| < 0.625: Cephes tanhf odd polynomial (no cancellation near 0); else 1 - 2 / (e^{2|x|} + 1).
    const float z = x * x;
    float p = -5.70498872745e-3f;
    p = p * z + 2.06390887954e-2f;
    p = p * z - 5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z - 3.33332819422e-1f;
    const float small = x + x * z * p;
    const float e = exp_fast(-2.0f * ax);
    const float big = std::copysign((1.0f - e) / (1.0f + e), x);
    return ax < 0.625f ? small : big;
}

inline double exp_fast(double x) {
    // Cephes exp: exp(x) = 2^n * exp(r), |r| <= ln2/2, exp(r) = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)), ~1 ulp.
    // The clamp keeps 2^n a normal number (n in [-1022, 1023]); beyond it exp under/overflows anyway, and
    // the sigmoid / tanh built on it are then 0, 1 or -1 to within 1e-307.
    x = x < -708.0 ? -708.0 : (x > 709.0 ? 709.0 : x);
    const double n = (x * 1.4426950408889634 + 6755399441055744.0) - 6755399441055744.0;  // round(x / ln2)
    const double r = (x - n * 6.93145751953125E-1) - n * 1.42860682030941723212E-6;
    const double rr = r * r;
    const double p = r * ((1.26177193074810590878E-4 * rr + 3.02994407707441961300E-2) * rr +
                          9.99999999999999999910E-1);
    const double q = ((3.00198505138664455042E-6 * rr + 2.52448340349684104192E-3) * rr +
                      2.27265548208155028766E-1) * rr + 2.00000000000000000009E0;
    const double scale = __builtin_bit_cast(double, (static_cast<int64_t>(n) + 1023) << 52);
    return (1.0 + 2.0 * p / (q - p)) * scale;
}

inline double tanh_fast(double x) {
    const double ax = std::fabs(x);
    // |x| < 0.625: Cephes tanh, x + x z P(z) / Q(z), z = x^2 (no cancellation near 0); else 1 - 2 / (e^{2|x|} + 1).
    const double z = x * x;
    const double P = (-9.64399179425052238628E-1 * z - 9.92877231001918586564E1) * z - 1.61468768441708447952E3;
    const double Q = ((z + 1.12811678491632931402E2) * z + 2.23548839060100448583E3) * z + 4.84406305325125486048E3;
    const double small = x + x * z * P / Q;
    const double e = exp_fast(-2.0 * ax);
    const double big = std::copysign((1.0 - e) / (1.0 + e), x);
    return ax < 0.625 ? small : big;
}

inline float sigmoid_(float x) { return 1.0f / (1.0f + exp_fast(-x)); }
inline double sigmoid_(double x) { return 1.0 / (1.0 + exp_fast(-x)); }
inline float tanh_(float x) { return tanh_fast(x); }
inline double tanh_(double x) { return tanh_fast(x); }

// Mean and 1/sqrt(biased var + eps) of n values (two passes, as a reference layer norm).
template <typename T>
inline void moments(const T* x, int64_t n, T eps, T* mean_out, T* rstd_out) {
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += x[j];
    const T mean = s / n;
    T v = 0;
#pragma omp simd reduction(+ : v)
    for (int64_t j = 0; j < n; ++j) v += (x[j] - mean) * (x[j] - mean);
    *mean_out = mean;
    *rstd_out = T(1) / std::sqrt(v / n + eps);
}

// One LSTM state update (lstm.lstm_update), for B rows of S units.
//   pre (+ add1 + add2): gate pre-activations; layer norm when gw != nullptr (gate: gw, gb (4, S);
//   cell: cw, cb (S)); mask: recurrent dropout on g (nullable).
//   Writes act = [sig(i), tanh(g), sig(f), sig(o)], c_next, h, and under layer norm gx (normalised
//   pre-activations), grstd (B, 4), cmean, crstd (B), tc = tanh(LN(c_next)).
template <typename T>
void cell_fwd(int64_t B, int64_t S, const T* pre, int64_t pre_s, const T* add1, int64_t add1_s,
              const T* add2, int64_t add2_s, const T* gw, const T* gb, const T* cw, const T* cb, T eps,
              const T* mask, const T* c_prev, T* act, T* c_next, T* h, int64_t h_s, T* gx, T* grstd,
              T* cmean, T* crstd, T* tc) {
    const int64_t G = 4 * S;
    for (int64_t b = 0; b < B; ++b) {
        const T* p = pre + b * pre_s;
        T* a = act + b * G;
        if (add1 && add2) {
            const T* q1 = add1 + b * add1_s;
            const T* q2 = add2 + b * add2_s;
#pragma omp simd
            for (int64_t j = 0; j < G; ++j) a[j] = p[j] + q1[j] + q2[j];
            p = a;
        } else if (add1) {
            const T* q1 = add1 + b * add1_s;
#pragma omp simd
            for (int64_t j = 0; j < G; ++j) a[j] = p[j] + q1[j];
            p = a;
        }
        if (gw) {
            T* xr = gx + b * G;
            for (int64_t k = 0; k < 4; ++k) {
                T mean, rstd;
                moments(p + k * S, S, eps, &mean, &rstd);
                grstd[b * 4 + k] = rstd;
                const T* pk = p + k * S;
                T* xk = xr + k * S;
                const T* wk = gw + k * S;
                const T* bk = gb + k * S;
                T* ak = a + k * S;
#pragma omp simd
                for (int64_t j = 0; j < S; ++j) {
                    const T v = (pk[j] - mean) * rstd;
                    xk[j] = v;
                    ak[j] = v * wk[j] + bk[j];
                }
            }
            p = a;
        }
        T* ai = a;
        T* ag = a + S;
        T* af = a + 2 * S;
        T* ao = a + 3 * S;
#pragma omp simd
        for (int64_t j = 0; j < S; ++j) {
            ai[j] = sigmoid_(p[j]);
            ag[j] = tanh_(p[S + j]);
            af[j] = sigmoid_(p[2 * S + j]);
            ao[j] = sigmoid_(p[3 * S + j]);
        }
        const T* m = mask ? mask + b * S : nullptr;
        const T* cp = c_prev + b * S;
        T* cn = c_next + b * S;
#pragma omp simd
        for (int64_t j = 0; j < S; ++j) cn[j] = af[j] * cp[j] + ai[j] * (m ? ag[j] * m[j] : ag[j]);
        T* hr = h + b * h_s;
        if (cw) {
            T mean, rstd;
            moments(cn, S, eps, &mean, &rstd);
            cmean[b] = mean;
            crstd[b] = rstd;
            T* t = tc + b * S;
#pragma omp simd
            for (int64_t j = 0; j < S; ++j) {
                t[j] = tanh_((cn[j] - mean) * rstd * cw[j] + cb[j]);
                hr[j] = ao[j] * t[j];
            }
        } else {
#pragma omp simd
            for (int64_t j = 0; j < S; ++j) hr[j] = ao[j] * tanh_(cn[j]);
        }
    }
}

// Backward of cell_fwd. dh (+ dh_add) and dc: gradients w.r.t. h and c_next. Writes dpre (the
// gradient w.r.t. the pre-activations before the gate norm) and dc_prev; accumulates the layer-norm
// parameter gradients into g_gw, g_gb (4, S), g_cw, g_cb (S). dc may alias dc_prev.
template <typename T, bool LNC, bool MASK, bool ADD>
void cell_bwd_impl(int64_t B, int64_t S, const T* dh, const T* dh_add, const T* dc, const T* act,
              const T* c_prev, const T* c_next, const T* tc, const T* mask, const T* gw, const T* cw,
              const T* gx, const T* grstd, const T* cmean, const T* crstd, T* dpre, int64_t dpre_s,
              T* dc_prev, T* g_gw, T* g_gb, T* g_cw, T* g_cb) {
    const int64_t G = 4 * S;
    for (int64_t b = 0; b < B; ++b) {
        const T* a = act + b * G;
        const T *ai = a, *ag = a + S, *af = a + 2 * S, *ao = a + 3 * S;
        const T* dhr = dh + b * S;
        const T* dha = dh_add ? dh_add + b * S : nullptr;
        const T* cn = c_next + b * S;
        const T* cp = c_prev + b * S;
        const T* dcr = dc + b * S;
        const T* m = mask ? mask + b * S : nullptr;
        T* dp = dpre + b * dpre_s;
        T* dcp = dc_prev + b * S;
        T mean = 0, rstd = 0, m1 = 0, m2 = 0;
        const T* t = cw ? tc + b * S : nullptr;
        if (LNC) {  // layer norm of the cell: the two row means of its backward
            mean = cmean[b];
            rstd = crstd[b];
            T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
            for (int64_t j = 0; j < S; ++j) {
                const T dhj = ADD ? dhr[j] + dha[j] : dhr[j];
                const T dtc = dhj * ao[j] * (T(1) - t[j] * t[j]);
                const T xhat = (cn[j] - mean) * rstd;
                const T dx = dtc * cw[j];
                s1 += dx;
                s2 += dx * xhat;
                g_cw[j] += dtc * xhat;
                g_cb[j] += dtc;
            }
            m1 = s1 / S;
            m2 = s2 / S;
        }
#pragma omp simd
        for (int64_t j = 0; j < S; ++j) {
            const T dhj = ADD ? dhr[j] + dha[j] : dhr[j];
            const T tj = LNC ? t[j] : tanh_(cn[j]);
            const T dtc = dhj * ao[j] * (T(1) - tj * tj);
            T dct;
            if (LNC) {
                const T xhat = (cn[j] - mean) * rstd;
                dct = dcr[j] + (dtc * cw[j] - m1 - xhat * m2) * rstd;
            } else {
                dct = dcr[j] + dtc;
            }
            const T g = ag[j];
            const T gm = MASK ? g * m[j] : g;
            const T dg = MASK ? dct * ai[j] * m[j] : dct * ai[j];
            dp[j] = dct * gm * ai[j] * (T(1) - ai[j]);
            dp[S + j] = dg * (T(1) - g * g);
            dp[2 * S + j] = dct * cp[j] * af[j] * (T(1) - af[j]);
            dp[3 * S + j] = dhj * tj * ao[j] * (T(1) - ao[j]);
            dcp[j] = dct * af[j];
        }
        if (gw) {  // layer norm of each gate block
            for (int64_t k = 0; k < 4; ++k) {
                T* dk = dp + k * S;
                const T* xk = gx + b * G + k * S;
                const T* wk = gw + k * S;
                T* gwk = g_gw + k * S;
                T* gbk = g_gb + k * S;
                T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
                for (int64_t j = 0; j < S; ++j) {
                    const T dy = dk[j];
                    gwk[j] += dy * xk[j];
                    gbk[j] += dy;
                    s1 += dy * wk[j];
                    s2 += dy * wk[j] * xk[j];
                }
                const T r = grstd[b * 4 + k], n1 = s1 / S, n2 = s2 / S;
#pragma omp simd
                for (int64_t j = 0; j < S; ++j) dk[j] = (dk[j] * wk[j] - n1 - xk[j] * n2) * r;
            }
        }
    }
}

// The options as template parameters: no per-element branches in the vectorised loops.
template <typename T>
void cell_bwd(int64_t B, int64_t S, const T* dh, const T* dh_add, const T* dc, const T* act,
              const T* c_prev, const T* c_next, const T* tc, const T* mask, const T* gw, const T* cw,
              const T* gx, const T* grstd, const T* cmean, const T* crstd, T* dpre, int64_t dpre_s,
              T* dc_prev, T* g_gw, T* g_gb, T* g_cw, T* g_cb) {
#define HN_CASE(LNC, MASK, ADD)                                                                         \
    if ((cw != nullptr) == LNC && (mask != nullptr) == MASK && (dh_add != nullptr) == ADD)              \
        return cell_bwd_impl<T, LNC, MASK, ADD>(B, S, dh, dh_add, dc, act, c_prev, c_next, tc, mask, gw, cw, \
                                                gx, grstd, cmean, crstd, dpre, dpre_s, dc_prev, g_gw, g_gb,  \
                                                g_cw, g_cb);
    HN_CASE(false, false, false) HN_CASE(false, false, true) HN_CASE(false, true, false)
    HN_CASE(false, true, true) HN_CASE(true, false, false) HN_CASE(true, false, true)
    HN_CASE(true, true, false) HN_CASE(true, true, true)
#undef HN_CASE
}

constexpr int64_t JB = 128;  // units per block: the (3, Nz, JB) slice of d_weight stays in L1

// Backward of hyper_pre_fwd (below) for dpre (B, 4H) and any N_z (hyper_pre_bwd uses it for N_z > 8): writes d_a (rows of stride da_s; d(a) = dpre * d_h),
// d_xw (B, 4H), dz (B, 3, 4, Nz); accumulates g_wd (3, 4, Nz, H) and g_bias (4H, nullable).
template <typename T>
void hyper_pre_bwd_generic(int64_t B, int64_t H, int64_t Nz, const T* dpre, const T* a, int64_t a_s, const T* xw,
                           const T* z, const T* wd, T* d_a, int64_t da_s, T* d_xw, T* dz, T* g_wd, T* g_bias) {
    // Rows go in groups of RB so that each g_wd element is loaded and stored once per group, not
    // once per row (this loop is bound by those loads and stores).
    constexpr int64_t RB = 4;
    const int64_t G = 4 * H, n = 4 * Nz;
    std::memset(dz, 0, sizeof(T) * B * 3 * n);
    T dd[3][RB][JB], d0[JB], d1[JB];
    for (int64_t g = 0; g < 4; ++g) {
        for (int64_t j0 = 0; j0 < H; j0 += JB) {
            const int64_t len = (H - j0 < JB) ? H - j0 : JB;
            const int64_t off = g * H + j0;
            for (int64_t b0 = 0; b0 < B; b0 += RB) {
                const int64_t rb = (B - b0 < RB) ? B - b0 : RB;
                for (int64_t r = 0; r < RB; ++r) {
                    if (r >= rb) {  // missing rows of the last group contribute zeros
                        for (int64_t k = 0; k < 3; ++k)
                            for (int64_t j = 0; j < len; ++j) dd[k][r][j] = 0;
                        continue;
                    }
                    const int64_t b = b0 + r;
                    const T* dp = dpre + b * G + off;
                    const T* ar = a + b * a_s + off;
                    const T* xr = xw + b * G + off;
                    T* dar = d_a + b * da_s + off;
                    T* dxr = d_xw + b * G + off;
#pragma omp simd
                    for (int64_t j = 0; j < len; ++j) {
                        d0[j] = 0;
                        d1[j] = 0;
                    }
                    for (int64_t q = 0; q < Nz; ++q) {
                        const T z0 = z[b * 3 * n + g * Nz + q], z1 = z[b * 3 * n + n + g * Nz + q];
                        const T* w0 = wd + ((0 * 4 + g) * Nz + q) * H + j0;
                        const T* w1 = wd + ((1 * 4 + g) * Nz + q) * H + j0;
#pragma omp simd
                        for (int64_t j = 0; j < len; ++j) {
                            d0[j] += z0 * w0[j];
                            d1[j] += z1 * w1[j];
                        }
                    }
                    T* e0 = dd[0][r];
                    T* e1 = dd[1][r];
                    T* e2 = dd[2][r];
#pragma omp simd
                    for (int64_t j = 0; j < len; ++j) {
                        dar[j] = dp[j] * d0[j];
                        dxr[j] = dp[j] * d1[j];
                        e0[j] = dp[j] * ar[j];
                        e1[j] = dp[j] * xr[j];
                        e2[j] = dp[j];
                    }
                    if (g_bias) {
#pragma omp simd
                        for (int64_t j = 0; j < len; ++j) g_bias[off + j] += dp[j];
                    }
                }
                for (int64_t k = 0; k < 3; ++k) {
                    for (int64_t q = 0; q < Nz; ++q) {
                        const T* w = wd + ((k * 4 + g) * Nz + q) * H + j0;
                        T* gwq = g_wd + ((k * 4 + g) * Nz + q) * H + j0;
                        const T *x0 = dd[k][0], *x1 = dd[k][1], *x2 = dd[k][2], *x3 = dd[k][3];
                        const T* zq = z + b0 * 3 * n + k * n + g * Nz + q;  // row r at zq[r * 3 * n]
                        const T z0 = zq[0];
                        const T z1 = rb > 1 ? zq[3 * n] : T(0);
                        const T z2 = rb > 2 ? zq[6 * n] : T(0);
                        const T z3 = rb > 3 ? zq[9 * n] : T(0);
                        T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
                        for (int64_t j = 0; j < len; ++j) {
                            const T wj = w[j];
                            s0 += x0[j] * wj;
                            s1 += x1[j] * wj;
                            s2 += x2[j] * wj;
                            s3 += x3[j] * wj;
                            gwq[j] += z0 * x0[j] + z1 * x1[j] + z2 * x2[j] + z3 * x3[j];
                        }
                        const T sr[RB] = {s0, s1, s2, s3};
                        for (int64_t r = 0; r < rb; ++r) dz[(b0 + r) * 3 * n + k * n + g * Nz + q] += sr[r];
                    }
                }
            }
        }
    }
}

// -- hyper_pre_fwd / hyper_pre_bwd in register blocks ---------------------------------------------
// The same arithmetic as the generic versions above, written on 64-byte vectors (GCC/Clang vector
// extensions: one AVX-512 register, two AVX2 ones, four NEON ones) so that the short sums over N_z stay
// in registers: a unit block's d_h, d_x, b(z) in three accumulators (forward); in backward the
// gradients of z in 3 N_z per-row accumulators (summed across lanes by one transpose tree per row), and
// the projections' gradients in a second pass that runs over the rows inside each unit block, so that
// each g_wd block is read and written once per call instead of once per row group. The tail of H that
// fills no vector runs the same code on scalars.
template <typename T>
struct VecOf {
    typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename W, typename T>
inline W ld(const T* p) {
    if constexpr (std::is_same_v<W, T>) {
        return *p;
    } else {
        W v;
        std::memcpy(&v, p, sizeof v);
        return v;
    }
}
template <typename W, typename T>
inline void st(T* p, W v) {
    if constexpr (std::is_same_v<W, T>) {
        *p = v;
    } else {
        std::memcpy(p, &v, sizeof v);
    }
}
template <typename T, int Bytes>
struct VecN {
    typedef T type __attribute__((vector_size(Bytes)));
};
// Sum of a vector's lanes by halving (64 -> 32 -> 16 bytes, then the last lanes).
template <typename T>
inline T hsum(Vec<T> v) {
    typename VecN<T, 32>::type lo, hi;
    std::memcpy(&lo, &v, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
    lo += hi;
    typename VecN<T, 16>::type l2, h2;
    std::memcpy(&l2, &lo, 16);
    std::memcpy(&h2, reinterpret_cast<const char*>(&lo) + 16, 16);
    l2 += h2;
    T s = 0;
    for (int64_t i = 0; i < int64_t(16 / sizeof(T)); ++i) s += l2[i];
    return s;
}

// pre[j] = b(z)[j] + a[j] d_h[j] + xw[j] d_x[j] for the units j .. j + width(W) of one row and gate.
template <typename W, typename T>
inline void pre_fwd_block(int64_t j, int64_t H, int64_t Nz, const T* z0, const T* z1, const T* z2, const T* w0,
                          const T* w1, const T* w2, const T* bg, const T* ar, const T* xr, T* pr) {
    W d0 = W{}, d1 = W{}, d2 = ld<W>(bg + j);
    for (int64_t q = 0; q < Nz; ++q) {
        d0 += z0[q] * ld<W>(w0 + q * H + j);
        d1 += z1[q] * ld<W>(w1 + q * H + j);
        d2 += z2[q] * ld<W>(w2 + q * H + j);
    }
    st<W>(pr + j, d2 + ld<W>(ar + j) * d0 + ld<W>(xr + j) * d1);
}

// HyperLSTM main pre-activations: d_k = z_k @ W_k per gate (k = h, x, b), then
//   pre = d_h * a + d_x * xw + d_b (+ bias)
// a: (B, >= 4H) rows of stride a_s (h_{t-1} @ W_h^T); xw: (B, 4H); z: (B, 3, 4, Nz);
// wd: (3, 4, Nz, H) (d_weight with its last two axes swapped); bias: (4H); pre: (B, 4H).
template <typename T>
void hyper_pre_fwd(int64_t B, int64_t H, int64_t Nz, const T* a, int64_t a_s, const T* xw, const T* z,
                   const T* wd, const T* bias, T* pre) {
    using V = Vec<T>;
    constexpr int64_t L = kLanes<T>;
    const int64_t G = 4 * H, n = 4 * Nz;
    for (int64_t g = 0; g < 4; ++g) {  // gate-major: the gate's (3, Nz, H) slice of wd stays in L1
        const T *w0 = wd + (0 * 4 + g) * Nz * H, *w1 = wd + (1 * 4 + g) * Nz * H, *w2 = wd + (2 * 4 + g) * Nz * H;
        const T* bg = bias + g * H;
        for (int64_t b = 0; b < B; ++b) {
            const T* z0 = z + b * 3 * n + g * Nz;
            const T *ar = a + b * a_s + g * H, *xr = xw + b * G + g * H;
            T* pr = pre + b * G + g * H;
            if (b + 1 < B)  // xw was written before the time loop, long out of cache
                for (int64_t j = 0; j < H; j += L) __builtin_prefetch(xr + G + j);
            int64_t j = 0;
            for (; j + 2 * L <= H; j += 2 * L) {  // two independent blocks: more FMAs in flight
                pre_fwd_block<V>(j, H, Nz, z0, z0 + n, z0 + 2 * n, w0, w1, w2, bg, ar, xr, pr);
                pre_fwd_block<V>(j + L, H, Nz, z0, z0 + n, z0 + 2 * n, w0, w1, w2, bg, ar, xr, pr);
            }
            for (; j + L <= H; j += L) pre_fwd_block<V>(j, H, Nz, z0, z0 + n, z0 + 2 * n, w0, w1, w2, bg, ar, xr, pr);
            for (; j < H; ++j) pre_fwd_block<T>(j, H, Nz, z0, z0 + n, z0 + 2 * n, w0, w1, w2, bg, ar, xr, pr);
        }
    }
}

// Lane sums of up to L = kLanes<T> vectors at once by a transpose-and-add tree: log2(L) levels, each
// adding the two halves of every pair of partial sums, so that K sums cost about 2K shuffles and K
// additions instead of K separate horizontal sums. Lane i of the result is the sum of the lanes of
// v[bitrev(i)] (the tree's order), so callers place their vectors at bit-reversed positions.
template <typename T>
constexpr int64_t kLog2Lanes = kLanes<T> == 16 ? 4 : kLanes<T> == 8 ? 3 : kLanes<T> == 4 ? 2 : 1;
template <typename T>
constexpr int64_t bitrev(int64_t i) {
    int64_t r = 0;
    for (int64_t k = 0; k < kLog2Lanes<T>; ++k) r |= ((i >> k) & 1) << (kLog2Lanes<T> - 1 - k);
    return r;
}
// Lane i of pick<Hi>(x, y) at half-width Hf: within each segment of 2 Hf lanes, the lower (or upper)
// Hf lanes of x's segment, then those of y's.
template <typename T, int64_t Hf, bool Hi>
constexpr int64_t pick_index(int64_t i) {
    const int64_t seg = i / (2 * Hf), r = i % (2 * Hf);
    return seg * 2 * Hf + (r % Hf) + (Hi ? Hf : 0) + (r < Hf ? 0 : kLanes<T>);
}
template <typename T, int64_t Hf, size_t... I>
inline Vec<T> fold_pair(Vec<T> x, Vec<T> y, std::index_sequence<I...>) {
#if defined(__clang__)
    return __builtin_shufflevector(x, y, pick_index<T, Hf, false>(I)...) +
           __builtin_shufflevector(x, y, pick_index<T, Hf, true>(I)...);
#else
    using M = typename VecOf<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>>::type;
    return __builtin_shuffle(x, y, M{pick_index<T, Hf, false>(I)...}) +
           __builtin_shuffle(x, y, M{pick_index<T, Hf, true>(I)...});
#endif
}
template <typename T, int64_t Hf, size_t... P>
inline void tree_level(Vec<T>* v, std::index_sequence<P...>) {
    ((v[P] = fold_pair<T, Hf>(v[2 * P], v[2 * P + 1], std::make_index_sequence<kLanes<T>>{})), ...);
}
template <typename T, int64_t Hf>
inline void tree(Vec<T>* v) {
    tree_level<T, Hf>(v, std::make_index_sequence<Hf>{});  // L / Hf partial vectors: Hf pairs
    if constexpr (Hf > 1) tree<T, Hf / 2>(v);
}
// s[m] = sum of the lanes of acc[Off + m], m < min(L, K - Off).
template <typename T, int64_t K, int64_t Off, size_t... I>
inline void lane_sums(const Vec<T>* acc, T* s, std::index_sequence<I...>) {
    Vec<T> v[kLanes<T>] = {(Off + bitrev<T>(I) < K ? acc[Off + bitrev<T>(I)] : Vec<T>{})...};
    tree<T, kLanes<T> / 2>(v);
    ((I < size_t(K - Off) ? void(s[I] = v[0][I]) : void()), ...);
    if constexpr (Off + kLanes<T> < K)
        lane_sums<T, K, Off + kLanes<T>>(acc, s + kLanes<T>, std::index_sequence<I...>{});
}

// Pass 1 of the backward for units j .. j + width(W) of one row and gate: d_a, d_xw, the parts of
// dz (into acc: 3 N_z accumulators, indexed by constants so that they stay in registers) and
// dpre * a, dpre * xw (into e0, e1 for pass 2).
template <int64_t Nz, typename W, typename T, size_t... Q>
inline void pre_bwd_block(int64_t j, int64_t H, const T* z0, const T* z1, const T* w0, const T* w1,
                          const T* w2, const T* dp, const T* ar, const T* xr, T* dar, T* dxr, T* e0, T* e1, W* acc,
                          std::index_sequence<Q...>) {
    const W g = ld<W>(dp + j), x0 = g * ld<W>(ar + j), x1 = g * ld<W>(xr + j);
    W d0 = W{}, d1 = W{};
    ((d0 += z0[Q] * ld<W>(w0 + Q * H + j)), ...);
    ((d1 += z1[Q] * ld<W>(w1 + Q * H + j)), ...);
    ((acc[Q] += x0 * ld<W>(w0 + Q * H + j)), ...);
    ((acc[Nz + Q] += x1 * ld<W>(w1 + Q * H + j)), ...);
    ((acc[2 * Nz + Q] += g * ld<W>(w2 + Q * H + j)), ...);
    st<W>(dar + j, g * d0);
    st<W>(dxr + j, g * d1);
    st<W>(e0 + j, x0);
    st<W>(e1 + j, x1);
}

// Pass 2: g_wd[k, g, q, j..] += sum over rows of z_k[b, q] e_k[b, j..] (e_2 = dpre), g_bias += sum of dpre.
template <int64_t Nz, typename W, typename T>
inline void pre_bwd_weights(int64_t j, int64_t B, int64_t H, int64_t n, int64_t G, const T* zg,
                            const T* e0, const T* e1, const T* dpg, T* gw0, T* gw1, T* gw2, T* gb) {
    W acc[3 * Nz] = {};
    W sb = W{};
    for (int64_t b = 0; b < B; ++b) {
        const T* zr = zg + b * 3 * n;
        const W x0 = ld<W>(e0 + b * H + j), x1 = ld<W>(e1 + b * H + j), x2 = ld<W>(dpg + b * G + j);
        sb += x2;
        for (int64_t q = 0; q < Nz; ++q) {
            acc[q] += zr[q] * x0;
            acc[Nz + q] += zr[n + q] * x1;
            acc[2 * Nz + q] += zr[2 * n + q] * x2;
        }
    }
    for (int64_t q = 0; q < Nz; ++q) {
        st<W>(gw0 + q * H + j, ld<W>(gw0 + q * H + j) + acc[q]);
        st<W>(gw1 + q * H + j, ld<W>(gw1 + q * H + j) + acc[Nz + q]);
        st<W>(gw2 + q * H + j, ld<W>(gw2 + q * H + j) + acc[2 * Nz + q]);
    }
    if (gb) st<W>(gb + j, ld<W>(gb + j) + sb);
}

template <int64_t Nz, typename T>
void hyper_pre_bwd_nz(int64_t B, int64_t H, const T* dpre, const T* a, int64_t a_s, const T* xw, const T* z,
                      const T* wd, T* d_a, int64_t da_s, T* d_xw, T* dz, T* g_wd, T* g_bias) {
    using V = Vec<T>;
    constexpr int64_t L = kLanes<T>;
    const int64_t G = 4 * H, n = 4 * Nz;
    thread_local std::vector<T> scratch;  // e0, e1 of one gate: (B, H) each
    if (scratch.size() < size_t(2 * B * H)) scratch.resize(2 * B * H);
    T *e0 = scratch.data(), *e1 = e0 + B * H;
    for (int64_t g = 0; g < 4; ++g) {
        const T *w0 = wd + (0 * 4 + g) * Nz * H, *w1 = wd + (1 * 4 + g) * Nz * H, *w2 = wd + (2 * 4 + g) * Nz * H;
        for (int64_t b = 0; b < B; ++b) {
            const T* z0 = z + b * 3 * n + g * Nz;
            const T *dp = dpre + b * G + g * H, *ar = a + b * a_s + g * H, *xr = xw + b * G + g * H;
            T *dar = d_a + b * da_s + g * H, *dxr = d_xw + b * G + g * H;
            if (b + 1 < B) {  // the next row's inputs and outputs are large buffers, long out of cache
                for (int64_t j = 0; j < H; j += L) {
                    __builtin_prefetch(ar + a_s + j);
                    __builtin_prefetch(xr + G + j);
                    __builtin_prefetch(dar + da_s + j, 1);
                    __builtin_prefetch(dxr + G + j, 1);
                }
            }
            constexpr auto Qs = std::make_index_sequence<Nz>{};
            V acc[3 * Nz] = {};
            T acc_s[3 * Nz] = {};
            int64_t j = 0;
            for (; j + L <= H; j += L)
                pre_bwd_block<Nz, V>(j, H, z0, z0 + n, w0, w1, w2, dp, ar, xr, dar, dxr, e0 + b * H, e1 + b * H, acc,
                                     Qs);
            for (; j < H; ++j)
                pre_bwd_block<Nz, T>(j, H, z0, z0 + n, w0, w1, w2, dp, ar, xr, dar, dxr, e0 + b * H, e1 + b * H, acc_s,
                                     Qs);
            T sums[3 * Nz];
            if constexpr (Nz >= 2) {  // six or more sums: the tree is cheaper than one horizontal sum each
                lane_sums<T, 3 * Nz, 0>(acc, sums, std::make_index_sequence<kLanes<T>>{});
            } else {
                for (int64_t k = 0; k < 3 * Nz; ++k) sums[k] = hsum<T>(acc[k]);
            }
            T* dzr = dz + b * 3 * n + g * Nz;
            for (int64_t k = 0; k < 3; ++k)
                for (int64_t q = 0; q < Nz; ++q) dzr[k * n + q] = sums[k * Nz + q] + acc_s[k * Nz + q];
        }
        T *gw0 = g_wd + (0 * 4 + g) * Nz * H, *gw1 = g_wd + (1 * 4 + g) * Nz * H, *gw2 = g_wd + (2 * 4 + g) * Nz * H;
        T* gb = g_bias ? g_bias + g * H : nullptr;
        const T* zg = z + g * Nz;
        const T* dpg = dpre + g * H;
        int64_t j = 0;
        for (; j + L <= H; j += L) pre_bwd_weights<Nz, V>(j, B, H, n, G, zg, e0, e1, dpg, gw0, gw1, gw2, gb);
        for (; j < H; ++j) pre_bwd_weights<Nz, T>(j, B, H, n, G, zg, e0, e1, dpg, gw0, gw1, gw2, gb);
    }
}

// N_z as a compile-time constant, so that the 3 N_z accumulators are registers; other N_z: the generic kernel.
template <typename T>
void hyper_pre_bwd(int64_t B, int64_t H, int64_t Nz, const T* dpre, const T* a, int64_t a_s, const T* xw,
                   const T* z, const T* wd, T* d_a, int64_t da_s, T* d_xw, T* dz, T* g_wd, T* g_bias) {
    switch (Nz) {
#define HN_NZ(K) \
    case K:      \
        return hyper_pre_bwd_nz<K, T>(B, H, dpre, a, a_s, xw, z, wd, d_a, da_s, d_xw, dz, g_wd, g_bias);
        HN_NZ(1) HN_NZ(2) HN_NZ(3) HN_NZ(4) HN_NZ(5) HN_NZ(6) HN_NZ(7) HN_NZ(8)
#undef HN_NZ
        default:
            return hyper_pre_bwd_generic<T>(B, H, Nz, dpre, a, a_s, xw, z, wd, d_a, da_s, d_xw, dz, g_wd, g_bias);
    }
}

// -- whole-sequence loops -------------------------------------------------------------------------
// The time loops of the fused Functions, so that a step costs no Python: the per-step products go
// to the BLAS that torch itself links (MKL: the Fortran sgemm_ / dgemm_, and for float32 batches of
// fixed size MKL's packed GEMM, the weight packed once per sequence, ~25% faster per step at
// batch-sized M); the addresses come from torch's library through hn_set_blas. Without them the
// Python loops of _fused.py run instead.
using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*,
                          const double*, const int*, const double*, const int*, const double*, double*,
                          const int*);
using pack_size_fn = size_t (*)(int, int, int, int);
using pack_fn = void (*)(int, int, int, int, int, int, float, const float*, int, float*);
using compute_fn = void (*)(int, int, int, int, int, int, const float*, int, const float*, int, float, float*,
                            int);
sgemm_fn g_sgemm = nullptr;
dgemm_fn g_dgemm = nullptr;
pack_size_fn g_pack_size = nullptr;
pack_fn g_pack = nullptr;
compute_fn g_compute = nullptr;
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112, kPacked = 151, kBMatrix = 162;  // MKL's CBLAS enums
// Packing a weight costs about one product of it, so it pays off only over several steps (a single
// sampling step keeps the plain product).
constexpr int64_t kPackMinSteps = 4;

// Row-major general product C (M, N) = beta * C + op(A) @ op(B), op(A) (M, K), op(B) (K, N).
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* Bm, int64_t ldb,
             T beta, T* C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    const char cb = tb ? 'T' : 'N', ca = ta ? 'T' : 'N';
    const int m = int(N), n = int(M), k = int(K), l1 = int(ldb), l2 = int(lda), l3 = int(ldc);
    const T one = 1;
    if (K <= 0) {  // no terms: C = beta * C
        for (int64_t i = 0; i < M; ++i)
            for (int64_t j = 0; j < N; ++j) C[i * ldc + j] = beta == T(0) ? T(0) : beta * C[i * ldc + j];
        return;
    }
    if constexpr (sizeof(T) == 4)
        g_sgemm(&cb, &ca, &m, &n, &k, &one, Bm, &l1, A, &l2, &beta, C, &l3);
    else
        g_dgemm(&cb, &ca, &m, &n, &k, &one, Bm, &l1, A, &l2, &beta, C, &l3);
}

// A weight operand of the per-step products: C (M, N) = beta * C + A (M, K) @ op(W), op(W) = W^T for
// W (N, K) (trans) or W for W (K, N); ldw is W's row stride. Row-major throughout; column-major BLAS
// sees the transposes.
template <typename T>
struct Weight {
    const T* w;
    int64_t ldw;
    bool trans;
    int64_t N, K;
    float* packed = nullptr;  // MKL's packed op(W) for products of exactly packed_m rows
    int64_t packed_m = -1;

    Weight(const T* w_, int64_t ldw_, bool trans_, int64_t N_, int64_t K_) : w(w_), ldw(ldw_), trans(trans_), N(N_), K(K_) {}
    Weight(const Weight&) = delete;
    Weight& operator=(const Weight&) = delete;
    ~Weight() { std::free(packed); }

    // Pack for products of M rows (float32 with MKL's packed GEMM only; otherwise a no-op).
    void pack(int64_t M) {
        if constexpr (sizeof(T) == 4) {
            if (!g_pack_size || !g_pack || !g_compute || M <= 0) return;
            const size_t bytes = g_pack_size(kBMatrix, int(M), int(N), int(K));
            packed = static_cast<float*>(std::malloc(bytes));
            if (!packed) return;  // plain products instead
            g_pack(kRowMajor, kBMatrix, trans ? kTrans : kNoTrans, int(M), int(N), int(K), 1.0f, w, int(ldw), packed);
            packed_m = M;
        }
    }

    void mm(int64_t M, const T* A, int64_t lda, T beta, T* C, int64_t ldc) const {
        if constexpr (sizeof(T) == 4) {
            if (packed && M == packed_m) {
                g_compute(kRowMajor, kNoTrans, kPacked, int(M), int(N), int(K), A, int(lda), packed, int(N), beta, C,
                          int(ldc));
                return;
            }
        }
        gemm_rm<T>(false, trans, M, N, K, A, lda, w, ldw, beta, C, ldc);
    }
};

// One LSTM (main or hyper) of the sequence loops: its layer norm (all four pointers null: none),
// recurrent-dropout mask (T, B, S) (nullable), the buffers saved for backward (_fused._Saved: act
// (T, B, 4S), c (T+1, B, S), and under layer norm gx (T, B, 4S), grstd (T, B, 4), cmean, crstd
// (T, B), tc (T, B, S)), and in backward the layer-norm parameter gradients.
struct Lstm {
    int64_t S;
    double eps;
    const void *gw, *gb, *cw, *cb, *mask;
    void *act, *c, *gx, *grstd, *cmean, *crstd, *tc;
    void *g_gw, *g_gb, *g_cw, *g_cb;
};

template <typename T>
inline const T* at(const void* p, int64_t off) { return p ? static_cast<const T*>(p) + off : nullptr; }
template <typename T>
inline T* at(void* p, int64_t off) { return p ? static_cast<T*>(p) + off : nullptr; }

// cell_fwd of step t on the first bt of B rows.
template <typename T>
void lstm_step_fwd(const Lstm& L, int64_t t, int64_t B, int64_t bt, const T* pre, int64_t pre_s, const T* add1,
                   int64_t add1_s, const T* add2, int64_t add2_s, T* h, int64_t h_s) {
    const int64_t S = L.S;
    cell_fwd<T>(bt, S, pre, pre_s, add1, add1_s, add2, add2_s, at<T>(L.gw, 0), at<T>(L.gb, 0), at<T>(L.cw, 0),
                at<T>(L.cb, 0), T(L.eps), at<T>(L.mask, t * B * S), at<T>(L.c, t * B * S),
                at<T>(L.act, t * B * 4 * S), at<T>(L.c, (t + 1) * B * S), h, h_s, at<T>(L.gx, t * B * 4 * S),
                at<T>(L.grstd, t * B * 4), at<T>(L.cmean, t * B), at<T>(L.crstd, t * B), at<T>(L.tc, t * B * S));
}

// cell_bwd of step t on the first bt of B rows; dc is updated in place.
template <typename T>
void lstm_step_bwd(const Lstm& L, int64_t t, int64_t B, int64_t bt, const T* dh, const T* dh_add, T* dc, T* dpre,
                   int64_t dpre_s) {
    const int64_t S = L.S;
    cell_bwd<T>(bt, S, dh, dh_add, dc, at<T>(L.act, t * B * 4 * S), at<T>(L.c, t * B * S),
                at<T>(L.c, (t + 1) * B * S), at<T>(L.tc, t * B * S), at<T>(L.mask, t * B * S), at<T>(L.gw, 0),
                at<T>(L.cw, 0), at<T>(L.gx, t * B * 4 * S), at<T>(L.grstd, t * B * 4), at<T>(L.cmean, t * B),
                at<T>(L.crstd, t * B), dpre, dpre_s, dc, at<T>(L.g_gw, 0), at<T>(L.g_gb, 0), at<T>(L.g_cw, 0),
                at<T>(L.g_cb, 0));
}

// The HyperLSTM layer's loops (_fused._HyperLSTMFunction; names as there). batch_sizes (T) or null:
// a packed batch sorted by decreasing length, step t on its first batch_sizes[t] rows.
struct HyperSeq {
    int64_t T, B, H, Hh, Nz;
    const int64_t* batch_sizes;
    // forward: inputs, then outputs / saved
    const void *xw, *xw_hat, *h0, *w_cat, *w_hat_hh, *z_weight, *zb, *wd, *bias;
    void *out, *hh_all, *z_all, *a_all, *pre, *hpre;
    // backward
    const void* d_out;
    void *d_xw, *d_a, *d_z, *dh, *dc, *dhh, *dch, *dpre, *g_wd, *g_bias;
    Lstm main, hyp;
};

template <typename T>
void hyper_seq_fwd(const HyperSeq& P) {
    const int64_t B = P.B, H = P.H, Hh = P.Hh, Nz = P.Nz, A = 4 * H + 4 * Hh, Z = 12 * Nz;
    const T *xw = at<T>(P.xw, 0), *xw_hat = at<T>(P.xw_hat, 0), *zb = at<T>(P.zb, 0);
    T *out = at<T>(P.out, 0), *hh_all = at<T>(P.hh_all, 0), *z_all = at<T>(P.z_all, 0);
    T *a_all = at<T>(P.a_all, 0), *pre = at<T>(P.pre, 0), *hpre = at<T>(P.hpre, 0);
    Weight<T> w_cat(at<T>(P.w_cat, 0), H, true, A, H);              // [W_h; W_hat_h] (A, H)
    Weight<T> w_hat_hh(at<T>(P.w_hat_hh, 0), Hh, true, 4 * Hh, Hh);  // (4Hh, Hh)
    Weight<T> z_weight(at<T>(P.z_weight, 0), Hh, true, Z, Hh);       // (Z, Hh)
    if (!P.batch_sizes && P.T >= kPackMinSteps) {
        w_cat.pack(B);
        w_hat_hh.pack(B);
        z_weight.pack(B);
    }
    for (int64_t t = 0; t < P.T; ++t) {
        const int64_t bt = P.batch_sizes ? P.batch_sizes[t] : B;
        const T* h = t == 0 ? at<T>(P.h0, 0) : out + (t - 1) * B * H;
        T* a = a_all + t * B * A;
        w_cat.mm(bt, h, H, T(0), a, A);                                           // h @ [W_h; W_hat_h]^T
        w_hat_hh.mm(bt, hh_all + t * B * Hh, Hh, T(0), hpre, 4 * Hh);
        T* hh = hh_all + (t + 1) * B * Hh;
        lstm_step_fwd<T>(P.hyp, t, B, bt, hpre, 4 * Hh, a + 4 * H, A, xw_hat + t * B * 4 * Hh, 4 * Hh, hh, Hh);
        T* z = z_all + t * B * Z;
        for (int64_t b = 0; b < bt; ++b) std::memcpy(z + b * Z, zb, sizeof(T) * Z);
        z_weight.mm(bt, hh, Hh, T(1), z, Z);                                       // z = z_b + h_hat W_z^T
        hyper_pre_fwd<T>(bt, H, Nz, a, A, xw + t * B * 4 * H, z, at<T>(P.wd, 0), at<T>(P.bias, 0), pre);
        lstm_step_fwd<T>(P.main, t, B, bt, pre, 4 * H, nullptr, 0, nullptr, 0, out + t * B * H, H);
    }
}

template <typename T>
void hyper_seq_bwd(const HyperSeq& P) {
    const int64_t B = P.B, H = P.H, Hh = P.Hh, Nz = P.Nz, A = 4 * H + 4 * Hh, Z = 12 * Nz;
    Weight<T> w_cat(at<T>(P.w_cat, 0), H, false, H, A);               // d(h_{t-1}) = d_a [W_h; W_hat_h]
    Weight<T> w_hat_hh(at<T>(P.w_hat_hh, 0), Hh, false, Hh, 4 * Hh);
    Weight<T> z_weight(at<T>(P.z_weight, 0), Hh, false, Hh, Z);
    if (!P.batch_sizes && P.T >= kPackMinSteps) {
        w_cat.pack(B);
        w_hat_hh.pack(B);
        z_weight.pack(B);
    }
    T *dh = at<T>(P.dh, 0), *dc = at<T>(P.dc, 0), *dhh = at<T>(P.dhh, 0), *dch = at<T>(P.dch, 0);
    T *dpre = at<T>(P.dpre, 0), *d_a = at<T>(P.d_a, 0), *d_z = at<T>(P.d_z, 0), *d_xw = at<T>(P.d_xw, 0);
    for (int64_t t = P.T - 1; t >= 0; --t) {
        const int64_t bt = P.batch_sizes ? P.batch_sizes[t] : B;
        lstm_step_bwd<T>(P.main, t, B, bt, dh, at<T>(P.d_out, t * B * H), dc, dpre, 4 * H);
        T *da = d_a + t * B * A, *dz = d_z + t * B * Z;
        hyper_pre_bwd<T>(bt, H, Nz, dpre, at<T>(P.a_all, t * B * A), A, at<T>(P.xw, t * B * 4 * H),
                         at<T>(P.z_all, t * B * Z), at<T>(P.wd, 0), da, A, d_xw + t * B * 4 * H, dz,
                         at<T>(P.g_wd, 0), at<T>(P.g_bias, 0));
        z_weight.mm(bt, dz, Z, T(1), dhh, Hh);                                     // dhh += dz W_z
        lstm_step_bwd<T>(P.hyp, t, B, bt, dhh, nullptr, dch, da + 4 * H, A);
        w_hat_hh.mm(bt, da + 4 * H, A, T(0), dhh, Hh);
        w_cat.mm(bt, da, A, T(0), dh, H);                                          // dh_{t-1}
    }
}

// The LSTM layer's loops (_fused._LSTMFunction): pre = h_{t-1} W_hh^T + xw_t, one LSTM update.
struct LstmSeq {
    int64_t T, B;
    const int64_t* batch_sizes;
    const void *xw, *h0, *w_hh;
    void *out, *pre;
    const void* d_out;
    void *d_xw, *dh, *dc;
    Lstm lstm;
};

template <typename T>
void lstm_seq_fwd(const LstmSeq& P) {
    const int64_t B = P.B, H = P.lstm.S;
    T *out = at<T>(P.out, 0), *pre = at<T>(P.pre, 0);
    Weight<T> w_hh(at<T>(P.w_hh, 0), H, true, 4 * H, H);
    if (!P.batch_sizes && P.T >= kPackMinSteps) w_hh.pack(B);
    for (int64_t t = 0; t < P.T; ++t) {
        const int64_t bt = P.batch_sizes ? P.batch_sizes[t] : B;
        const T* h = t == 0 ? at<T>(P.h0, 0) : out + (t - 1) * B * H;
        w_hh.mm(bt, h, H, T(0), pre, 4 * H);
        lstm_step_fwd<T>(P.lstm, t, B, bt, pre, 4 * H, at<T>(P.xw, t * B * 4 * H), 4 * H, nullptr, 0,
                         out + t * B * H, H);
    }
}

template <typename T>
void lstm_seq_bwd(const LstmSeq& P) {
    const int64_t B = P.B, H = P.lstm.S;
    T *dh = at<T>(P.dh, 0), *dc = at<T>(P.dc, 0), *d_xw = at<T>(P.d_xw, 0);
    Weight<T> w_hh(at<T>(P.w_hh, 0), H, false, H, 4 * H);
    if (!P.batch_sizes && P.T >= kPackMinSteps) w_hh.pack(B);
    for (int64_t t = P.T - 1; t >= 0; --t) {
        const int64_t bt = P.batch_sizes ? P.batch_sizes[t] : B;
        T* dp = d_xw + t * B * 4 * H;
        lstm_step_bwd<T>(P.lstm, t, B, bt, dh, at<T>(P.d_out, t * B * H), dc, dp, 4 * H);
        w_hh.mm(bt, dp, 4 * H, T(0), dh, H);
    }
}

// -- one HyperLSTMCell step (hyper_lstm._HyperStep), forward and backward in one call each --------
// For step loops written for nn.LSTMCell: every product of the step in BLAS and every elementwise
// part in the kernels above, so that a step is one call each way instead of ~25 torch ops.
// Shapes, parameters (hb, b0 nullable) and the step's saved work buffer (hyper_step_ws_size elements).
struct HyperStep {
    int64_t B, I, H, Hh, Nz;
    const void *w_ih, *w_hh, *hw_ih, *hw_hh, *hb, *zw, *zb, *dw, *b0;
    void* ws;
};

// Offsets into the work buffer: per-row blocks, then the transposed projection.
struct StepLayout {
    int64_t xw, a, pre, act, c0, c1, hpre, hact, hc0, hc1, hh0, hh1, z, wd, total;
    StepLayout(int64_t B, int64_t H, int64_t Hh, int64_t Nz) {
        int64_t o = 0;
        auto take = [&](int64_t n) { const int64_t at = o; o += n; return at; };
        xw = take(B * 4 * H), a = take(B * 4 * H), pre = take(B * 4 * H), act = take(B * 4 * H);
        c0 = take(B * H), c1 = take(B * H), hpre = take(B * 4 * Hh), hact = take(B * 4 * Hh);
        hc0 = take(B * Hh), hc1 = take(B * Hh), hh0 = take(B * Hh), hh1 = take(B * Hh), z = take(B * 12 * Nz);
        wd = take(12 * Nz * H);
        total = o;
    }
};

// x (B, I), h (B, H), c (B, H) and the hyper state hh, ch (B, Hh; null: zeros) -> h_new (B, H) and
// c_ext = [c', h_hat', c_hat'] (B, H + 2 Hh); saves what backward needs in ws.
template <typename T>
void hyper_step_fwd(const HyperStep& P, const T* x, const T* h, const T* c, int64_t c_s, const T* hh, int64_t hh_s,
                    const T* ch, int64_t ch_s, T* h_new, T* c_ext) {
    const int64_t B = P.B, I = P.I, H = P.H, Hh = P.Hh, Nz = P.Nz, E = H + 2 * Hh;
    const StepLayout L(B, H, Hh, Nz);
    T* ws = static_cast<T*>(P.ws);
    const T *w_ih = at<T>(P.w_ih, 0), *w_hh = at<T>(P.w_hh, 0), *hw_ih = at<T>(P.hw_ih, 0);
    const T *dw = at<T>(P.dw, 0), *zb = at<T>(P.zb, 0), *hb = at<T>(P.hb, 0), *b0 = at<T>(P.b0, 0);
    T *wd = ws + L.wd, *z = ws + L.z, *hpre = ws + L.hpre;
    for (int64_t k = 0; k < 12; ++k)  // d_weight (3, 4, H, Nz) -> (3, 4, Nz, H)
        for (int64_t j = 0; j < H; ++j)
            for (int64_t q = 0; q < Nz; ++q) wd[(k * Nz + q) * H + j] = dw[(k * H + j) * Nz + q];
    for (int64_t b = 0; b < B; ++b) {  // the states the kernels read, contiguous
        std::memcpy(ws + L.c0 + b * H, c + b * c_s, sizeof(T) * H);
        for (int64_t j = 0; j < Hh; ++j) {
            ws[L.hh0 + b * Hh + j] = hh ? hh[b * hh_s + j] : T(0);
            ws[L.hc0 + b * Hh + j] = ch ? ch[b * ch_s + j] : T(0);
        }
        for (int64_t j = 0; j < 4 * Hh; ++j) hpre[b * 4 * Hh + j] = hb ? hb[j] : T(0);
        for (int64_t j = 0; j < 12 * Nz; ++j) z[b * 12 * Nz + j] = j < 8 * Nz ? zb[j] : T(0);
    }
    gemm_rm<T>(false, true, B, 4 * H, I, x, I, w_ih, I, T(0), ws + L.xw, 4 * H);       // W_x x
    gemm_rm<T>(false, true, B, 4 * H, H, h, H, w_hh, H, T(0), ws + L.a, 4 * H);        // W_h h
    // the hyper LSTM reads [h; x] and its own h_hat: hb + W_hat [h; x] + W_hat_hh h_hat
    gemm_rm<T>(false, true, B, 4 * Hh, H, h, H, hw_ih, H + I, T(1), hpre, 4 * Hh);
    gemm_rm<T>(false, true, B, 4 * Hh, I, x, I, hw_ih + H, H + I, T(1), hpre, 4 * Hh);
    gemm_rm<T>(false, true, B, 4 * Hh, Hh, ws + L.hh0, Hh, at<T>(P.hw_hh, 0), Hh, T(1), hpre, 4 * Hh);
    cell_fwd<T>(B, Hh, hpre, 4 * Hh, nullptr, 0, nullptr, 0, nullptr, nullptr, nullptr, nullptr, T(0), nullptr,
                ws + L.hc0, ws + L.hact, ws + L.hc1, ws + L.hh1, Hh, nullptr, nullptr, nullptr, nullptr, nullptr);
    gemm_rm<T>(false, true, B, 12 * Nz, Hh, ws + L.hh1, Hh, at<T>(P.zw, 0), Hh, T(1), z, 12 * Nz);  // z
    thread_local std::vector<T> zeros;
    if (!b0 && zeros.size() < size_t(4 * H)) zeros.assign(4 * H, T(0));
    hyper_pre_fwd<T>(B, H, Nz, ws + L.a, 4 * H, ws + L.xw, z, wd, b0 ? b0 : zeros.data(), ws + L.pre);
    cell_fwd<T>(B, H, ws + L.pre, 4 * H, nullptr, 0, nullptr, 0, nullptr, nullptr, nullptr, nullptr, T(0), nullptr,
                ws + L.c0, ws + L.act, ws + L.c1, h_new, H, nullptr, nullptr, nullptr, nullptr, nullptr);
    for (int64_t b = 0; b < B; ++b) {
        std::memcpy(c_ext + b * E, ws + L.c1 + b * H, sizeof(T) * H);
        std::memcpy(c_ext + b * E + H, ws + L.hh1 + b * Hh, sizeof(T) * Hh);
        std::memcpy(c_ext + b * E + H + Hh, ws + L.hc1 + b * Hh, sizeof(T) * Hh);
    }
}

// Gradients of one step: dh_new (B, H), dc_ext (B, H + 2 Hh, row stride dc_s) -> dx (B, I; null: not
// wanted), dh (B, H), dstate = [dc, dh_hat, dc_hat] (B, H + 2 Hh) and the parameters' gradients
// (g_hb, g_b0 null when the parameter is).
template <typename T>
void hyper_step_bwd(const HyperStep& P, const T* x, const T* h, const T* dh_new, const T* dc_ext, int64_t dc_s,
                    T* dx, T* dh, T* dstate, T* g_w_ih, T* g_w_hh, T* g_hw_ih, T* g_hw_hh, T* g_hb, T* g_zw,
                    T* g_zb, T* g_dw, T* g_b0) {
    const int64_t B = P.B, I = P.I, H = P.H, Hh = P.Hh, Nz = P.Nz, E = H + 2 * Hh, Z = 12 * Nz;
    const StepLayout L(B, H, Hh, Nz);
    const T* ws = static_cast<const T*>(P.ws);
    const T *w_ih = at<T>(P.w_ih, 0), *w_hh = at<T>(P.w_hh, 0), *hw_ih = at<T>(P.hw_ih, 0);
    const T *hw_hh = at<T>(P.hw_hh, 0), *zw = at<T>(P.zw, 0);
    thread_local std::vector<T> buf;
    const int64_t need = B * (4 * H + 4 * H + 4 * H + 4 * Hh + Z + H + 2 * Hh) + 12 * Nz * H;
    if (buf.size() < size_t(need)) buf.resize(need);
    T *dpre = buf.data(), *d_a = dpre + B * 4 * H, *d_xw = d_a + B * 4 * H, *dhpre = d_xw + B * 4 * H;
    T *dz = dhpre + B * 4 * Hh, *dc = dz + B * Z, *dhh = dc + B * H, *dch = dhh + B * Hh, *g_wd = dch + B * Hh;
    for (int64_t b = 0; b < B; ++b) {
        std::memcpy(dc + b * H, dc_ext + b * dc_s, sizeof(T) * H);
        std::memcpy(dhh + b * Hh, dc_ext + b * dc_s + H, sizeof(T) * Hh);
        std::memcpy(dch + b * Hh, dc_ext + b * dc_s + H + Hh, sizeof(T) * Hh);
    }
    std::memset(g_wd, 0, sizeof(T) * 12 * Nz * H);
    if (g_b0) std::memset(g_b0, 0, sizeof(T) * 4 * H);
    cell_bwd<T>(B, H, dh_new, nullptr, dc, ws + L.act, ws + L.c0, ws + L.c1, nullptr, nullptr, nullptr, nullptr,
                nullptr, nullptr, nullptr, nullptr, dpre, 4 * H, dc, nullptr, nullptr, nullptr, nullptr);
    hyper_pre_bwd<T>(B, H, Nz, dpre, ws + L.a, 4 * H, ws + L.xw, ws + L.z, ws + L.wd, d_a, 4 * H, d_xw, dz, g_wd,
                     g_b0);
    gemm_rm<T>(false, false, B, Hh, Z, dz, Z, zw, Hh, T(1), dhh, Hh);                   // dh_hat += dz W_z
    cell_bwd<T>(B, Hh, dhh, nullptr, dch, ws + L.hact, ws + L.hc0, ws + L.hc1, nullptr, nullptr, nullptr, nullptr,
                nullptr, nullptr, nullptr, nullptr, dhpre, 4 * Hh, dch, nullptr, nullptr, nullptr, nullptr);
    // inputs: dh = d_a W_h + dhpre W_hat_h, dx = d_xw W_x + dhpre W_hat_x, dh_hat_prev = dhpre W_hat_hh
    gemm_rm<T>(false, false, B, H, 4 * H, d_a, 4 * H, w_hh, H, T(0), dh, H);
    gemm_rm<T>(false, false, B, H, 4 * Hh, dhpre, 4 * Hh, hw_ih, H + I, T(1), dh, H);
    if (dx) {
        gemm_rm<T>(false, false, B, I, 4 * H, d_xw, 4 * H, w_ih, I, T(0), dx, I);
        gemm_rm<T>(false, false, B, I, 4 * Hh, dhpre, 4 * Hh, hw_ih + H, H + I, T(1), dx, I);
    }
    for (int64_t b = 0; b < B; ++b) {
        std::memcpy(dstate + b * E, dc + b * H, sizeof(T) * H);
        std::memcpy(dstate + b * E + H + Hh, dch + b * Hh, sizeof(T) * Hh);
    }
    gemm_rm<T>(false, false, B, Hh, 4 * Hh, dhpre, 4 * Hh, hw_hh, Hh, T(0), dstate + H, E);
    // parameters
    gemm_rm<T>(true, false, 4 * H, I, B, d_xw, 4 * H, x, I, T(0), g_w_ih, I);
    gemm_rm<T>(true, false, 4 * H, H, B, d_a, 4 * H, h, H, T(0), g_w_hh, H);
    gemm_rm<T>(true, false, 4 * Hh, H, B, dhpre, 4 * Hh, h, H, T(0), g_hw_ih, H + I);
    gemm_rm<T>(true, false, 4 * Hh, I, B, dhpre, 4 * Hh, x, I, T(0), g_hw_ih + H, H + I);
    gemm_rm<T>(true, false, 4 * Hh, Hh, B, dhpre, 4 * Hh, ws + L.hh0, Hh, T(0), g_hw_hh, Hh);
    gemm_rm<T>(true, false, Z, Hh, B, dz, Z, ws + L.hh1, Hh, T(0), g_zw, Hh);
    for (int64_t j = 0; j < 4 * Hh; ++j) {
        T s = 0;
        for (int64_t b = 0; b < B; ++b) s += dhpre[b * 4 * Hh + j];
        if (g_hb) g_hb[j] = s;
    }
    for (int64_t j = 0; j < 8 * Nz; ++j) {
        T s = 0;
        for (int64_t b = 0; b < B; ++b) s += dz[b * Z + j];
        g_zb[j] = s;
    }
    for (int64_t k = 0; k < 12; ++k)  // (3, 4, Nz, H) -> d_weight's (3, 4, H, Nz)
        for (int64_t j = 0; j < H; ++j)
            for (int64_t q = 0; q < Nz; ++q) g_dw[(k * H + j) * Nz + q] = g_wd[(k * Nz + q) * H + j];
}

}  // namespace

// sgemm_, dgemm_ (required) and MKL's cblas_sgemm_pack_get_size, cblas_sgemm_pack, cblas_sgemm_compute
// (nullable: plain products then).
extern "C" void hn_set_blas(void* sgemm, void* dgemm, void* pack_size, void* pack, void* compute) {
    g_sgemm = reinterpret_cast<sgemm_fn>(sgemm);
    g_dgemm = reinterpret_cast<dgemm_fn>(dgemm);
    g_pack_size = reinterpret_cast<pack_size_fn>(pack_size);
    g_pack = reinterpret_cast<pack_fn>(pack);
    g_compute = reinterpret_cast<compute_fn>(compute);
}
extern "C" void hyper_seq_fwd_f32(const HyperSeq* p) { hyper_seq_fwd<float>(*p); }
extern "C" void hyper_seq_fwd_f64(const HyperSeq* p) { hyper_seq_fwd<double>(*p); }
extern "C" void hyper_seq_bwd_f32(const HyperSeq* p) { hyper_seq_bwd<float>(*p); }
extern "C" void hyper_seq_bwd_f64(const HyperSeq* p) { hyper_seq_bwd<double>(*p); }
extern "C" void lstm_seq_fwd_f32(const LstmSeq* p) { lstm_seq_fwd<float>(*p); }
extern "C" void lstm_seq_fwd_f64(const LstmSeq* p) { lstm_seq_fwd<double>(*p); }
extern "C" void lstm_seq_bwd_f32(const LstmSeq* p) { lstm_seq_bwd<float>(*p); }
extern "C" void lstm_seq_bwd_f64(const LstmSeq* p) { lstm_seq_bwd<double>(*p); }
extern "C" int64_t hyper_step_ws_size(int64_t B, int64_t H, int64_t Hh, int64_t Nz) {
    return StepLayout(B, H, Hh, Nz).total;
}
#define HN_STEP(T, suffix)                                                                                        \
    extern "C" void hyper_step_fwd_##suffix(const HyperStep* p, const T* x, const T* h, const T* c, int64_t c_s,     \
                                            const T* hh, int64_t hh_s, const T* ch, int64_t ch_s, T* h_new,      \
                                            T* c_ext) {                                                           \
        hyper_step_fwd<T>(*p, x, h, c, c_s, hh, hh_s, ch, ch_s, h_new, c_ext);                                    \
    }                                                                                                             \
    extern "C" void hyper_step_bwd_##suffix(const HyperStep* p, const T* x, const T* h, const T* dh_new,            \
                                            const T* dc_ext, int64_t dc_s, T* dx, T* dh, T* dstate, T* g_w_ih,   \
                                            T* g_w_hh, T* g_hw_ih, T* g_hw_hh, T* g_hb, T* g_zw, T* g_zb,        \
                                            T* g_dw, T* g_b0) {                                                   \
        hyper_step_bwd<T>(*p, x, h, dh_new, dc_ext, dc_s, dx, dh, dstate, g_w_ih, g_w_hh, g_hw_ih, g_hw_hh, g_hb, \
                          g_zw, g_zb, g_dw, g_b0);                                                                \
    }
HN_STEP(float, f32)
HN_STEP(double, f64)
#undef HN_STEP

#define HN_EXPORT(T, suffix)                                                                              \
    extern "C" void cell_fwd_##suffix(int64_t B, int64_t S, const T* pre, int64_t pre_s, const T* add1,   \
                                      int64_t add1_s, const T* add2, int64_t add2_s, const T* gw,         \
                                      const T* gb, const T* cw, const T* cb, double eps, const T* mask,   \
                                      const T* c_prev, T* act, T* c_next, T* h, int64_t h_s, T* gx,       \
                                      T* grstd, T* cmean, T* crstd, T* tc) {                              \
        cell_fwd<T>(B, S, pre, pre_s, add1, add1_s, add2, add2_s, gw, gb, cw, cb, T(eps), mask, c_prev,   \
                    act, c_next, h, h_s, gx, grstd, cmean, crstd, tc);                                    \
    }                                                                                                     \
    extern "C" void cell_bwd_##suffix(int64_t B, int64_t S, const T* dh, const T* dh_add, const T* dc,    \
                                      const T* act, const T* c_prev, const T* c_next, const T* tc,        \
                                      const T* mask, const T* gw, const T* cw, const T* gx,               \
                                      const T* grstd, const T* cmean, const T* crstd, T* dpre,            \
                                      int64_t dpre_s, T* dc_prev, T* g_gw, T* g_gb, T* g_cw, T* g_cb) {   \
        cell_bwd<T>(B, S, dh, dh_add, dc, act, c_prev, c_next, tc, mask, gw, cw, gx, grstd, cmean, crstd, \
                    dpre, dpre_s, dc_prev, g_gw, g_gb, g_cw, g_cb);                                       \
    }                                                                                                     \
    extern "C" void hyper_pre_fwd_##suffix(int64_t B, int64_t H, int64_t Nz, const T* a, int64_t a_s,     \
                                           const T* xw, const T* z, const T* wd, const T* bias, T* pre) { \
        hyper_pre_fwd<T>(B, H, Nz, a, a_s, xw, z, wd, bias, pre);                                         \
    }                                                                                                     \
    extern "C" void hyper_pre_bwd_##suffix(int64_t B, int64_t H, int64_t Nz, const T* dpre, const T* a,   \
                                           int64_t a_s, const T* xw, const T* z, const T* wd, T* d_a,     \
                                           int64_t da_s, T* d_xw, T* dz, T* g_wd, T* g_bias) {            \
        hyper_pre_bwd<T>(B, H, Nz, dpre, a, a_s, xw, z, wd, d_a, da_s, d_xw, dz, g_wd, g_bias);           \
    }

HN_EXPORT(float, f32)
HN_EXPORT(double, f64)

extern "C" int hn_kernels_abi_version() { return 2; }
