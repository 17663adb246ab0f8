// CPU kernel of sasa::local_attention: every pixel attends over the in-image part of its k x k
// window, softmax(q.k + row_bias[di] + col_bias[dj]) v, with its backward pass.
//
// The inputs are repacked once per call (ATen ops) into zero-padded rows, [B*heads][H][d][x], so
// that one query row and the key rows it reads are each contiguous, and every offset's key for
// query x sits at padded position x + dj: the loops then run without border tests, and
// out-of-image keys are excluded by an additive -inf mask (and rows of keys outside the image
// are skipped). The work is vectorised along x with the compiler's vector extensions (8 floats /
// 4 doubles); the k column offsets of a window row are register-blocked four at a time, so q is
// loaded once for four dot products. The softmax is exact per pixel (max, exp, sum); only the
// log-sum-exp is saved, and the backward pass recomputes the probabilities (as FlashAttention).
// Gradients of the keys and values are gathered per key position (no scattered read-modify-write),
// and each task owns one (image, head), so no two threads write the same memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));

template <typename T> struct Vec;
template <> struct Vec<float> { using type = f8; static constexpr int64_t N = 8; };
template <> struct Vec<double> { using type = d4; static constexpr int64_t N = 4; };

template <typename VT, typename T> inline VT load(const T* p) {
  VT v;
  std::memcpy(&v, p, sizeof(VT));
  return v;
}
template <typename VT, typename T> inline void store(T* p, VT v) { std::memcpy(p, &v, sizeof(VT)); }
template <typename VT, typename T> inline VT splat(T s) { return VT{} + s; }

// exp(x) for x <= ~0 (logit minus max or minus log-sum-exp): Cephes' range reduction and degree-6
// polynomial (relative error ~1e-7), -inf -> 0. Vectorised by hand; libm's expf is not.
inline f8 vexp(f8 x) {
  const f8 lo = splat<f8>(-87.0f);
  const i8 under = x < lo;
  const f8 xc = under ? lo : x;
  const i8 n = __builtin_convertvector(xc * 1.44269504088896341f - 0.5f, i8);  // round to nearest for <= 0.5
  const f8 nf = __builtin_convertvector(n, f8);
  const f8 r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  f8 p = splat<f8>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const f8 scale = (f8)((n + 127) << 23);
  return under ? splat<f8>(0.0f) : p * scale;
}

inline d4 vexp(d4 x) {  // float64 serves gradcheck and the tests, not speed
  for (int i = 0; i < 4; ++i) x[i] = std::exp(x[i]);
  return x;
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Sizes of the padded rows. Query-side rows (q, grad_out, probabilities, their gradients) hold
// query x at LP + x, zeros around; key-side rows (k, v) hold key x at c + x, so the key of query
// x at column offset dj is at x + dj. Columns are processed in blocks of 4 (K4 >= K).
struct Geometry {
  int64_t B, heads, BH, D, H, W, K, c, K4, N, Wr, LP, SK, SQ;
  Geometry(const at::Tensor& q, int64_t kernel_size, int64_t vec) {
    B = q.size(0), heads = q.size(1), BH = B * heads, D = q.size(2), H = q.size(3), W = q.size(4);
    K = kernel_size, c = K / 2, K4 = round_up(K, 4), N = vec;
    Wr = round_up(W, N);
    LP = round_up(K - 1, N);
    SK = round_up(Wr + K4 - 1, N);
    SQ = LP + SK + N;
  }
  int64_t di_lo(int64_t y) const { return std::max<int64_t>(0, c - y); }
  int64_t di_hi(int64_t y) const { return std::min<int64_t>(K, H + c - y); }
};

// (B, heads, C, H, W), any strides (broadcast bias tables have zero strides) -> (BH, H, C, width)
// with the image at [left, left + W) and zeros around. Parallel over rows, one pass.
template <typename T>
at::Tensor pack(const at::Tensor& t, const Geometry& g, int64_t channels, int64_t left, int64_t width) {
  at::Tensor packed = at::empty({g.BH, g.H, channels, width}, t.options());
  const T* src = t.data_ptr<T>();
  T* dst = packed.data_ptr<T>();
  const auto st = t.strides();
  at::parallel_for(0, g.BH * g.H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / g.H, y = task % g.H;
      const T* s = src + (bh / g.heads) * st[0] + (bh % g.heads) * st[1] + y * st[3];
      for (int64_t c = 0; c < channels; ++c) {
        T* row = dst + (task * channels + c) * width;
        const T* sc = s + c * st[2];
        std::fill(row, row + left, T(0));
        for (int64_t x = 0; x < g.W; ++x) row[left + x] = sc[x * st[4]];
        std::fill(row + left + g.W, row + width, T(0));
      }
    }
  });
  return packed;
}

// inverse of pack: (BH, H, C, width) -> contiguous (B, heads, C, H, W); called after the packed
// inputs are freed, so they and the outputs are never all alive at once
at::Tensor unpack(const at::Tensor& packed, const Geometry& g, int64_t left) {
  return packed.narrow(3, left, g.W).permute({0, 2, 1, 3}).reshape({g.B, g.heads, packed.size(2), g.H, g.W}).contiguous();
}

// additive mask [K4][Wr]: -inf where the key of (dj, x) is outside the image; 0 for the padded
// queries x >= W (their logits stay finite and their gradients are multiplied by zeros)
template <typename T> std::vector<T> column_mask(const Geometry& g) {
  std::vector<T> mask(g.K4 * g.Wr, -std::numeric_limits<T>::infinity());
  for (int64_t dj = 0; dj < g.K; ++dj)
    for (int64_t x = 0; x < g.Wr; ++x) {
      const int64_t key = x + dj - g.c;
      if (x >= g.W || (key >= 0 && key < g.W)) mask[dj * g.Wr + x] = 0;
    }
  return mask;
}

struct Packed {
  at::Tensor q, k, v, brow, bcol;
};

template <typename T>
Packed pack_inputs(const Geometry& g, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const at::Tensor& brow, const at::Tensor& bcol) {
  std::vector<int64_t> bias_shape = {g.B, g.heads, g.K, g.H, g.W};
  return {pack<T>(q, g, g.D, g.LP, g.SQ), pack<T>(k, g, g.D, g.c, g.SK), pack<T>(v, g, g.D, g.c, g.SK),
          pack<T>(brow.expand(bias_shape), g, g.K, 0, g.Wr), pack<T>(bcol.expand(bias_shape), g, g.K, 0, g.Wr)};
}

// logits of query columns [x, x + N) for column offsets dj0 .. dj0 + 3 of window row di:
// acc[j] = q . k + row bias + column bias + mask
template <typename T>
inline void logits4(const Geometry& g, const T* Q, const T* Krow, const T* brow, const T* bcol, const T* mask,
                    int64_t x, int64_t di, int64_t dj0, typename Vec<T>::type acc[4]) {
  using VT = typename Vec<T>::type;
  const VT br = load<VT>(brow + di * g.Wr + x);
  for (int j = 0; j < 4; ++j) {
    const int64_t dj = std::min(dj0 + j, g.K - 1);  // lanes past K repeat the last column; never stored
    acc[j] = br + load<VT>(bcol + dj * g.Wr + x) + load<VT>(mask + dj * g.Wr + x);
  }
  for (int64_t d = 0; d < g.D; ++d) {
    const VT qd = load<VT>(Q + d * g.SQ + g.LP + x);
    const T* kd = Krow + d * g.SK + x + dj0;
    acc[0] += qd * load<VT>(kd);
    acc[1] += qd * load<VT>(kd + 1);
    acc[2] += qd * load<VT>(kd + 2);
    acc[3] += qd * load<VT>(kd + 3);
  }
}

Geometry checked_geometry(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kernel_size) {
  TORCH_CHECK(q.dim() == 5, "q must be (B, heads, d, H, W)");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "q, k and v must have the same shape");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "kernel_size must be odd and positive");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "float32 or float64 only");
  return Geometry(q, kernel_size, q.scalar_type() == at::kFloat ? Vec<float>::N : Vec<double>::N);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& brow, const at::Tensor& bcol, int64_t kernel_size) {
  const Geometry g = checked_geometry(q, k, v, kernel_size);
  at::Tensor out_p = at::empty({g.BH, g.H, g.D, g.Wr}, q.options());
  at::Tensor lse_p = at::empty({g.BH, g.H, 1, g.Wr}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_local_attention_forward", [&] {
    using T = scalar_t;
    using VT = typename Vec<T>::type;
    const Packed p = pack_inputs<T>(g, q, k, v, brow, bcol);
    const std::vector<T> mask = column_mask<T>(g);
    const T *qp = p.q.data_ptr<T>(), *kp = p.k.data_ptr<T>(), *vp = p.v.data_ptr<T>();
    const T *brp = p.brow.data_ptr<T>(), *bcp = p.bcol.data_ptr<T>();
    T *op = out_p.data_ptr<T>(), *lp = lse_p.data_ptr<T>();
    at::parallel_for(0, g.BH * g.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<VT> L(g.K * g.K4);  // one chunk's logits, then probabilities, per offset
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / g.H, y = task % g.H;
        const int64_t di_lo = g.di_lo(y), di_hi = g.di_hi(y);
        const T* Q = qp + task * g.D * g.SQ;
        const T* br = brp + task * g.K * g.Wr;
        const T* bc = bcp + task * g.K * g.Wr;
        const T* Kbh = kp + bh * g.H * g.D * g.SK;
        const T* Vbh = vp + bh * g.H * g.D * g.SK;
        for (int64_t x = 0; x < g.Wr; x += g.N) {
          VT m = splat<VT>(-std::numeric_limits<T>::infinity());
          for (int64_t di = di_lo; di < di_hi; ++di) {
            const T* Krow = Kbh + (y + di - g.c) * g.D * g.SK;
            for (int64_t dj0 = 0; dj0 < g.K; dj0 += 4) {
              VT acc[4];
              logits4(g, Q, Krow, br, bc, mask.data(), x, di, dj0, acc);
              for (int64_t j = 0; j < 4 && dj0 + j < g.K; ++j) {
                L[di * g.K4 + dj0 + j] = acc[j];
                m = m > acc[j] ? m : acc[j];
              }
            }
          }
          VT s = splat<VT>(T(0));
          for (int64_t di = di_lo; di < di_hi; ++di)
            for (int64_t dj = 0; dj < g.K; ++dj) {
              VT& l = L[di * g.K4 + dj];
              l = vexp(l - m);
              s += l;
            }
          const VT inv = T(1) / s;
          T* O = op + task * g.D * g.Wr + x;
          for (int64_t d = 0; d < g.D; ++d) {
            VT acc = splat<VT>(T(0));
            for (int64_t di = di_lo; di < di_hi; ++di) {
              const T* vd = Vbh + ((y + di - g.c) * g.D + d) * g.SK + x;
              for (int64_t dj = 0; dj < g.K; ++dj) acc += L[di * g.K4 + dj] * load<VT>(vd + dj);
            }
            store(O + d * g.Wr, acc * inv);
          }
          VT lse;
          for (int64_t i = 0; i < g.N; ++i) lse[i] = m[i] + std::log(s[i]);
          store(lp + task * g.Wr + x, lse);
        }
      }
    });
  });
  return {unpack(out_p, g, 0), unpack(lse_p, g, 0).squeeze(2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& brow, const at::Tensor& bcol, const at::Tensor& out, const at::Tensor& lse,
    int64_t kernel_size) {
  const Geometry g = checked_geometry(q, k, v, kernel_size);
  // accumulated into: zeroed by the task that owns them, while they are in its cache
  at::Tensor dq_p = at::empty({g.BH, g.H, g.D, g.Wr}, q.options());
  at::Tensor dk_p = at::empty({g.BH, g.H, g.D, g.SK}, q.options());
  at::Tensor dv_p = at::empty({g.BH, g.H, g.D, g.SK}, q.options());
  at::Tensor drow_p = at::empty({g.BH, g.H, g.K, g.Wr}, q.options());
  at::Tensor dcol_p = at::empty({g.BH, g.H, g.K, g.Wr}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_local_attention_backward", [&] {
    using T = scalar_t;
    using VT = typename Vec<T>::type;
    const Packed p = pack_inputs<T>(g, q, k, v, brow, bcol);
    const at::Tensor g_p = pack<T>(grad_out, g, g.D, g.LP, g.SQ);
    const at::Tensor delta_p = pack<T>((grad_out * out).sum(2, true), g, 1, 0, g.Wr);  // sum_s p_s (dout . v_s)
    const at::Tensor lse_p = pack<T>(lse.unsqueeze(2), g, 1, 0, g.Wr);
    const std::vector<T> mask = column_mask<T>(g);
    const T *qp = p.q.data_ptr<T>(), *kp = p.k.data_ptr<T>(), *vp = p.v.data_ptr<T>();
    const T *brp = p.brow.data_ptr<T>(), *bcp = p.bcol.data_ptr<T>();
    const T *gp = g_p.data_ptr<T>(), *dlp = delta_p.data_ptr<T>(), *lp = lse_p.data_ptr<T>();
    T *dqp = dq_p.data_ptr<T>(), *dkp = dk_p.data_ptr<T>(), *dvp = dv_p.data_ptr<T>();
    T *drp = drow_p.data_ptr<T>(), *dcp = dcol_p.data_ptr<T>();
    at::parallel_for(0, g.BH, 1, [&](int64_t begin, int64_t end) {
      // one query row's probabilities and logit gradients, per offset, laid out like query rows
      std::vector<T> P(g.K * g.K4 * g.SQ, T(0)), DS(g.K * g.K4 * g.SQ, T(0));
      for (int64_t bh = begin; bh < end; ++bh) {
        std::fill_n(dkp + bh * g.H * g.D * g.SK, g.H * g.D * g.SK, T(0));
        std::fill_n(dvp + bh * g.H * g.D * g.SK, g.H * g.D * g.SK, T(0));
        std::fill_n(drp + bh * g.H * g.K * g.Wr, g.H * g.K * g.Wr, T(0));
        std::fill_n(dcp + bh * g.H * g.K * g.Wr, g.H * g.K * g.Wr, T(0));
        for (int64_t y = 0; y < g.H; ++y) {
          const int64_t task = bh * g.H + y, di_lo = g.di_lo(y), di_hi = g.di_hi(y);
          const T* Q = qp + task * g.D * g.SQ;
          const T* G = gp + task * g.D * g.SQ;
          const T* br = brp + task * g.K * g.Wr;
          const T* bc = bcp + task * g.K * g.Wr;
          T* dbr = drp + task * g.K * g.Wr;
          T* dbc = dcp + task * g.K * g.Wr;
          const T* Kbh = kp + bh * g.H * g.D * g.SK;
          const T* Vbh = vp + bh * g.H * g.D * g.SK;
          // probabilities and logit gradients: ds = p (dout . v - delta)
          for (int64_t x = 0; x < g.Wr; x += g.N) {
            const VT lse_x = load<VT>(lp + task * g.Wr + x);
            const VT delta_x = load<VT>(dlp + task * g.Wr + x);
            for (int64_t di = di_lo; di < di_hi; ++di) {
              const int64_t row = (y + di - g.c) * g.D * g.SK;
              VT dbr_acc = load<VT>(dbr + di * g.Wr + x);
              for (int64_t dj0 = 0; dj0 < g.K; dj0 += 4) {
                VT s[4], dp[4] = {};
                logits4(g, Q, Kbh + row, br, bc, mask.data(), x, di, dj0, s);
                for (int64_t d = 0; d < g.D; ++d) {
                  const VT gd = load<VT>(G + d * g.SQ + g.LP + x);
                  const T* vd = Vbh + row + d * g.SK + x + dj0;
                  for (int j = 0; j < 4; ++j) dp[j] += gd * load<VT>(vd + j);
                }
                for (int64_t j = 0; j < 4 && dj0 + j < g.K; ++j) {
                  const int64_t o = (di * g.K4 + dj0 + j) * g.SQ + g.LP + x;
                  const VT prob = vexp(s[j] - lse_x);
                  const VT ds = prob * (dp[j] - delta_x);
                  store(P.data() + o, prob);
                  store(DS.data() + o, ds);
                  dbr_acc += ds;
                  T* dc = dbc + (dj0 + j) * g.Wr + x;
                  store(dc, load<VT>(dc) + ds);
                }
              }
              store(dbr + di * g.Wr + x, dbr_acc);
            }
          }
          // dq = sum over offsets of ds * k
          for (int64_t d = 0; d < g.D; ++d)
            for (int64_t x = 0; x < g.Wr; x += g.N) {
              VT acc = splat<VT>(T(0));
              for (int64_t di = di_lo; di < di_hi; ++di) {
                const T* kd = Kbh + ((y + di - g.c) * g.D + d) * g.SK + x;
                const T* ds = DS.data() + di * g.K4 * g.SQ + g.LP + x;
                for (int64_t dj = 0; dj < g.K; ++dj) acc += load<VT>(ds + dj * g.SQ) * load<VT>(kd + dj);
              }
              store(dqp + (task * g.D + d) * g.Wr + x, acc);
            }
          // dk (dv) at padded key position xk: sum over column offsets of ds (p) * q (dout) of the
          // query at xk - dj; queries outside the row read zeros
          for (int64_t di = di_lo; di < di_hi; ++di) {
            const int64_t row = (y + di - g.c) * g.D * g.SK;
            for (int64_t d = 0; d < g.D; ++d) {
              const T* qd = Q + d * g.SQ + g.LP;
              const T* gd = G + d * g.SQ + g.LP;
              T* dkd = dkp + bh * g.H * g.D * g.SK + row + d * g.SK;
              T* dvd = dvp + bh * g.H * g.D * g.SK + row + d * g.SK;
              for (int64_t xk = 0; xk < g.SK; xk += g.N) {
                VT dk_acc = load<VT>(dkd + xk), dv_acc = load<VT>(dvd + xk);
                for (int64_t dj = 0; dj < g.K; ++dj) {
                  const int64_t o = (di * g.K4 + dj) * g.SQ + g.LP + xk - dj;
                  dk_acc += load<VT>(DS.data() + o) * load<VT>(qd + xk - dj);
                  dv_acc += load<VT>(P.data() + o) * load<VT>(gd + xk - dj);
                }
                store(dkd + xk, dk_acc);
                store(dvd + xk, dv_acc);
              }
            }
          }
        }
      }
    });
  });
  return {unpack(dq_p, g, 0), unpack(dk_p, g, g.c), unpack(dv_p, g, g.c), unpack(drow_p, g, 0), unpack(dcol_p, g, 0)};
}

}  // namespace

TORCH_LIBRARY(sasa_cpu, m) {
  m.def("local_attention_forward", &forward);
  m.def("local_attention_backward", &backward);
}
