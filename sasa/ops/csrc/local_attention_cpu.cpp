// CPU kernel of sasa::local_attention: every pixel attends over the in-image part of its k x k
// window, softmax(q.k + q_row.r_row[di] + q_col.r_col[dj]) v, with its backward pass.
//
// Each task copies the rows it needs of one (image, head) from the op's tensors (any strides)
// into thread-local zero-padded rows, [y][d][x], so that one query row and the key rows it reads
// are each contiguous and stay in cache, and every offset's key for query x sits at padded
// position x + dj: the loops then run without border tests, and out-of-image keys are excluded by
// an additive -inf mask (rows of keys outside the image are skipped). The relative logits of a
// row are computed from its q and the embeddings when needed, never stored. Results are written
// straight into the outputs, so the only memory besides them is a few hundred KiB per thread.
// The work is vectorised along x with the compiler's vector extensions (8 floats / 4 doubles);
// the k column offsets of a window row are register-blocked four at a time, so q is loaded once
// for four dot products. The softmax is exact per pixel (max, exp, sum); only the log-sum-exp is
// saved, and the backward pass recomputes the probabilities (as FlashAttention). Gradients of the
// keys and values are gathered per key position (no scattered read-modify-write), and each
// backward task owns one (image, head), so no two threads write the same memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace {

using namespace sasa_simd;

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

// One (image, head) of a (B, heads, C, H, W) tensor with any strides (q, k and v arrive as views
// of one qkv tensor).
template <typename T> struct Plane {
  T* p;
  int64_t sc, sy, sx;
  Plane(const at::Tensor& t, int64_t bh, int64_t heads)
      : p(t.data_ptr<T>() + (bh / heads) * t.stride(0) + (bh % heads) * t.stride(1)),
        sc(t.stride(2)), sy(t.stride(3)), sx(t.stride(4)) {}
  T* at(int64_t c, int64_t y) const { return p + c * sc + y * sy; }
};

// rows [y0, y1) of channels [0, C) -> dst[y - y0][c][width], the image at [left, left + W), zeros around
template <typename T>
void pack_rows(const Plane<T>& src, int64_t C, int64_t W, int64_t y0, int64_t y1, int64_t left, int64_t width, T* dst) {
  for (int64_t y = y0; y < y1; ++y)
    for (int64_t c = 0; c < C; ++c) {
      T* row = dst + ((y - y0) * C + c) * width;
      const T* s = src.at(c, y);
      std::fill(row, row + left, T(0));
      for (int64_t x = 0; x < W; ++x) row[left + x] = s[x * src.sx];
      std::fill(row + left + W, row + width, T(0));
    }
}

// the W image values of each of C padded rows (stride width, image at left) -> channels of row y
// of an output this file allocated (contiguous rows)
template <typename T>
void unpack_row(const T* src, int64_t C, int64_t W, int64_t left, int64_t width, const Plane<T>& dst, int64_t y) {
  for (int64_t c = 0; c < C; ++c) std::copy_n(src + c * width + left, W, dst.at(c, y));
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

// logits of query columns [x, x + N) for column offsets dj0 .. dj0 + 3 of window row di:
// acc[j] = q . k + row relative logit + column relative logit + mask
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

// The relative embeddings of one head, (d/2, K) rows and columns, or none (pos_enc != relative).
template <typename T> struct Relative {
  const T *row = nullptr, *col = nullptr;
  int64_t half = 0;
  Relative(const std::optional<at::Tensor>& r, const std::optional<at::Tensor>& c, int64_t head, int64_t K) {
    if (!r) return;
    half = r->size(1);
    row = r->data_ptr<T>() + head * half * K;
    col = c->data_ptr<T>() + head * half * K;
  }
};

// relative logits of one query row, bias[i][x] = q_half(x) . emb[:, i] for the row (first d/2
// channels) and column (last d/2) embeddings; zeros without relative embeddings
template <typename T>
void relative_logits(const Geometry& g, const Relative<T>& rel, const T* Q, T* br, T* bc) {
  std::fill(br, br + g.K * g.Wr, T(0));
  std::fill(bc, bc + g.K * g.Wr, T(0));
  for (int64_t i = 0; i < g.K; ++i)
    for (int64_t c = 0; c < rel.half; ++c) {
      const T er = rel.row[c * g.K + i], ec = rel.col[c * g.K + i];
      const T* qr = Q + c * g.SQ + g.LP;
      const T* qc = Q + (rel.half + c) * g.SQ + g.LP;
      for (int64_t x = 0; x < g.Wr; ++x) {
        br[i * g.Wr + x] += qr[x] * er;
        bc[i * g.Wr + x] += qc[x] * ec;
      }
    }
}

std::optional<at::Tensor> checked_relative(const std::optional<at::Tensor>& r, const at::Tensor& q, int64_t kernel_size) {
  if (!r) return r;
  TORCH_CHECK(r->dim() == 3 && r->size(0) == q.size(1) && 2 * r->size(1) == q.size(2) && r->size(2) == kernel_size,
              "relative embeddings must be (heads, d/2, kernel_size)");
  return r->to(q.scalar_type()).contiguous();
}

constexpr int64_t ROWS_PER_TASK = 8;  // forward: tasks are (image, head, block of rows)

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const std::optional<at::Tensor>& rel_row_, const std::optional<at::Tensor>& rel_col_,
                                           int64_t kernel_size) {
  const Geometry g = checked_geometry(q, k, v, kernel_size);
  TORCH_CHECK(rel_row_.has_value() == rel_col_.has_value(), "give both relative embeddings or neither");
  const auto rel_row = checked_relative(rel_row_, q, kernel_size), rel_col = checked_relative(rel_col_, q, kernel_size);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({g.B, g.heads, 1, g.H, g.W}, q.options());
  const int64_t blocks = (g.H + ROWS_PER_TASK - 1) / ROWS_PER_TASK;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_local_attention_forward", [&] {
    using T = scalar_t;
    using VT = typename Vec<T>::type;
    const std::vector<T> mask = column_mask<T>(g);
    const int64_t R = ROWS_PER_TASK, RK = R + 2 * g.c;
    at::parallel_for(0, g.BH * blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> Qb(R * g.D * g.SQ), Kb(RK * g.D * g.SK), Vb(RK * g.D * g.SK), BR(g.K * g.Wr), BC(g.K * g.Wr);
      std::vector<T> Ob(g.D * g.Wr), lse_row(g.Wr);
      std::vector<VT> L(g.K * g.K4);  // one chunk's logits, then probabilities, per offset
      for (int64_t task = begin; task < end; ++task) {
        const int64_t bh = task / blocks, y0 = (task % blocks) * R, y1 = std::min(g.H, y0 + R);
        const int64_t ylo = std::max<int64_t>(0, y0 - g.c), yhi = std::min(g.H, y1 + g.c);
        pack_rows(Plane<T>(q, bh, g.heads), g.D, g.W, y0, y1, g.LP, g.SQ, Qb.data());
        pack_rows(Plane<T>(k, bh, g.heads), g.D, g.W, ylo, yhi, g.c, g.SK, Kb.data());
        pack_rows(Plane<T>(v, bh, g.heads), g.D, g.W, ylo, yhi, g.c, g.SK, Vb.data());
        const Relative<T> rel(rel_row, rel_col, bh % g.heads, g.K);
        const Plane<T> out_plane(out, bh, g.heads), lse_plane(lse, bh, g.heads);
        for (int64_t y = y0; y < y1; ++y) {
          const int64_t di_lo = g.di_lo(y), di_hi = g.di_hi(y);
          const T* Q = Qb.data() + (y - y0) * g.D * g.SQ;
          const T *br = BR.data(), *bc = BC.data();
          relative_logits(g, rel, Q, BR.data(), BC.data());
          for (int64_t x = 0; x < g.Wr; x += g.N) {
            VT m = splat<VT>(-std::numeric_limits<T>::infinity());
            for (int64_t di = di_lo; di < di_hi; ++di) {
              const T* Krow = Kb.data() + (y + di - g.c - ylo) * g.D * g.SK;
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
            for (int64_t d = 0; d < g.D; ++d) {
              VT acc = splat<VT>(T(0));
              for (int64_t di = di_lo; di < di_hi; ++di) {
                const T* vd = Vb.data() + ((y + di - g.c - ylo) * g.D + d) * g.SK + x;
                for (int64_t dj = 0; dj < g.K; ++dj) acc += L[di * g.K4 + dj] * load<VT>(vd + dj);
              }
              store(Ob.data() + d * g.Wr + x, acc * inv);
            }
            for (int64_t i = 0; i < g.N; ++i) lse_row[x + i] = m[i] + std::log(s[i]);
          }
          unpack_row(Ob.data(), g.D, g.W, 0, g.Wr, out_plane, y);
          unpack_row(lse_row.data(), 1, g.W, 0, g.Wr, lse_plane, y);
        }
      }
    });
  });
  return {out, lse.squeeze(2)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& rel_row_, const std::optional<at::Tensor>& rel_col_, const at::Tensor& out,
    const at::Tensor& lse, int64_t kernel_size) {
  const Geometry g = checked_geometry(q, k, v, kernel_size);
  TORCH_CHECK(rel_row_.has_value() == rel_col_.has_value(), "give both relative embeddings or neither");
  const auto rel_row = checked_relative(rel_row_, q, kernel_size), rel_col = checked_relative(rel_col_, q, kernel_size);
  const int64_t half = rel_row ? rel_row->size(1) : 0, threads = at::get_num_threads();
  const at::Tensor lse5 = lse.unsqueeze(2);
  at::Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options()), dv = at::empty(q.sizes(), q.options());
  // gradients of the embeddings are sums over every pixel: one partial sum per thread, added up after
  at::Tensor drel = at::zeros({threads, 2, g.heads, half, g.K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_local_attention_backward", [&] {
    using T = scalar_t;
    using VT = typename Vec<T>::type;
    const std::vector<T> mask = column_mask<T>(g);
    // one (image, head) per task: its rows add into each other's dk and dv, never into another task's
    at::parallel_for(0, g.BH, 1, [&](int64_t begin, int64_t end) {
      const int64_t qsize = g.H * g.D * g.SQ, ksize = g.H * g.D * g.SK;
      T* drel_thread = drel.data_ptr<T>() + at::get_thread_num() * 2 * g.heads * half * g.K;
      std::vector<T> Qb(qsize), Gb(qsize), Ob(qsize), Kb(ksize), Vb(ksize), dKb(ksize), dVb(ksize), BR(g.K * g.Wr), BC(g.K * g.Wr);
      std::vector<T> lse_row(g.Wr), delta(g.Wr), dQ(g.D * g.Wr), dBR(g.K * g.Wr), dBC(g.K * g.Wr);
      // one query row's probabilities and logit gradients, per offset, laid out like query rows
      std::vector<T> P(g.K * g.K4 * g.SQ, T(0)), DS(g.K * g.K4 * g.SQ, T(0));
      for (int64_t bh = begin; bh < end; ++bh) {
        pack_rows(Plane<T>(q, bh, g.heads), g.D, g.W, 0, g.H, g.LP, g.SQ, Qb.data());
        pack_rows(Plane<T>(grad_out, bh, g.heads), g.D, g.W, 0, g.H, g.LP, g.SQ, Gb.data());
        pack_rows(Plane<T>(out, bh, g.heads), g.D, g.W, 0, g.H, g.LP, g.SQ, Ob.data());
        pack_rows(Plane<T>(k, bh, g.heads), g.D, g.W, 0, g.H, g.c, g.SK, Kb.data());
        pack_rows(Plane<T>(v, bh, g.heads), g.D, g.W, 0, g.H, g.c, g.SK, Vb.data());
        const Relative<T> rel(rel_row, rel_col, bh % g.heads, g.K);
        T* drel_row = drel_thread + (bh % g.heads) * half * g.K;
        T* drel_col = drel_row + g.heads * half * g.K;
        std::fill(dKb.begin(), dKb.end(), T(0));
        std::fill(dVb.begin(), dVb.end(), T(0));
        const Plane<T> lse_plane(lse5, bh, g.heads), dq_plane(dq, bh, g.heads);
        for (int64_t y = 0; y < g.H; ++y) {
          const int64_t di_lo = g.di_lo(y), di_hi = g.di_hi(y);
          const T* Q = Qb.data() + y * g.D * g.SQ;
          const T* G = Gb.data() + y * g.D * g.SQ;
          const T* O = Ob.data() + y * g.D * g.SQ;
          const T *br = BR.data(), *bc = BC.data();
          relative_logits(g, rel, Q, BR.data(), BC.data());
          // padded queries x >= W: lse 0 and delta 0 keep their (unused) probabilities finite
          std::fill(lse_row.begin(), lse_row.end(), T(0));
          for (int64_t x = 0; x < g.W; ++x) lse_row[x] = lse_plane.at(0, y)[x * lse_plane.sx];
          std::fill(delta.begin(), delta.end(), T(0));  // sum_s p_s (dout . v_s) = dout . out
          for (int64_t d = 0; d < g.D; ++d)
            for (int64_t x = 0; x < g.Wr; ++x) delta[x] += G[d * g.SQ + g.LP + x] * O[d * g.SQ + g.LP + x];
          std::fill(dBR.begin(), dBR.end(), T(0));
          std::fill(dBC.begin(), dBC.end(), T(0));
          // probabilities and logit gradients: ds = p (dout . v - delta)
          for (int64_t x = 0; x < g.Wr; x += g.N) {
            const VT lse_x = load<VT>(lse_row.data() + x);
            const VT delta_x = load<VT>(delta.data() + x);
            for (int64_t di = di_lo; di < di_hi; ++di) {
              const int64_t row = (y + di - g.c) * g.D * g.SK;
              VT dbr_acc = splat<VT>(T(0));
              for (int64_t dj0 = 0; dj0 < g.K; dj0 += 4) {
                VT s[4], dp[4] = {};
                logits4(g, Q, Kb.data() + row, br, bc, mask.data(), x, di, dj0, s);
                for (int64_t d = 0; d < g.D; ++d) {
                  const VT gd = load<VT>(G + d * g.SQ + g.LP + x);
                  const T* vd = Vb.data() + row + d * g.SK + x + dj0;
                  for (int j = 0; j < 4; ++j) dp[j] += gd * load<VT>(vd + j);
                }
                for (int64_t j = 0; j < 4 && dj0 + j < g.K; ++j) {
                  const int64_t o = (di * g.K4 + dj0 + j) * g.SQ + g.LP + x;
                  const VT prob = vexp(s[j] - lse_x);
                  const VT ds = prob * (dp[j] - delta_x);
                  store(P.data() + o, prob);
                  store(DS.data() + o, ds);
                  dbr_acc += ds;
                  T* dc = dBC.data() + (dj0 + j) * g.Wr + x;
                  store(dc, load<VT>(dc) + ds);
                }
              }
              store(dBR.data() + di * g.Wr + x, dbr_acc);
            }
          }
          // relative term: d emb[c][i] += sum_x dbias[i][x] q_half[c][x], and dq_half += dbias . emb
          for (int64_t i = 0; i < g.K; ++i)
            for (int64_t c = 0; c < half; ++c) {
              const T* qr = Q + c * g.SQ + g.LP;
              const T* qc = Q + (half + c) * g.SQ + g.LP;
              T sr = 0, sc = 0;
              for (int64_t x = 0; x < g.W; ++x) {
                sr += dBR[i * g.Wr + x] * qr[x];
                sc += dBC[i * g.Wr + x] * qc[x];
              }
              drel_row[c * g.K + i] += sr;
              drel_col[c * g.K + i] += sc;
            }
          std::fill(dQ.begin(), dQ.end(), T(0));
          for (int64_t c = 0; c < half; ++c)
            for (int64_t i = 0; i < g.K; ++i) {
              const T er = rel.row[c * g.K + i], ec = rel.col[c * g.K + i];
              for (int64_t x = 0; x < g.Wr; ++x) {
                dQ[c * g.Wr + x] += dBR[i * g.Wr + x] * er;
                dQ[(half + c) * g.Wr + x] += dBC[i * g.Wr + x] * ec;
              }
            }
          // dq += sum over offsets of ds * k
          for (int64_t d = 0; d < g.D; ++d)
            for (int64_t x = 0; x < g.Wr; x += g.N) {
              VT acc = load<VT>(dQ.data() + d * g.Wr + x);
              for (int64_t di = di_lo; di < di_hi; ++di) {
                const T* kd = Kb.data() + ((y + di - g.c) * g.D + d) * g.SK + x;
                const T* ds = DS.data() + di * g.K4 * g.SQ + g.LP + x;
                for (int64_t dj = 0; dj < g.K; ++dj) acc += load<VT>(ds + dj * g.SQ) * load<VT>(kd + dj);
              }
              store(dQ.data() + d * g.Wr + x, acc);
            }
          unpack_row(dQ.data(), g.D, g.W, 0, g.Wr, dq_plane, y);
          // dk (dv) at padded key position xk: sum over column offsets of ds (p) * q (dout) of the
          // query at xk - dj; queries outside the row read zeros
          for (int64_t di = di_lo; di < di_hi; ++di) {
            const int64_t row = (y + di - g.c) * g.D * g.SK;
            for (int64_t d = 0; d < g.D; ++d) {
              const T* qd = Q + d * g.SQ + g.LP;
              const T* gd = G + d * g.SQ + g.LP;
              T* dkd = dKb.data() + row + d * g.SK;
              T* dvd = dVb.data() + row + d * g.SK;
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
        const Plane<T> dk_plane(dk, bh, g.heads), dv_plane(dv, bh, g.heads);
        for (int64_t yy = 0; yy < g.H; ++yy) {
          unpack_row(dKb.data() + yy * g.D * g.SK, g.D, g.W, g.c, g.SK, dk_plane, yy);
          unpack_row(dVb.data() + yy * g.D * g.SK, g.D, g.W, g.c, g.SK, dv_plane, yy);
        }
      }
    });
  });
  if (!rel_row) return {dq, dk, dv, q.new_empty({0}), q.new_empty({0})};  // no embeddings, no gradients
  return {dq, dk, dv, drel.select(1, 0).sum(0).to(rel_row_->scalar_type()), drel.select(1, 1).sum(0).to(rel_col_->scalar_type())};
}

}  // namespace

TORCH_LIBRARY(sasa_cpu, m) {
  m.def("local_attention_forward", &forward);
  m.def("local_attention_backward", &backward);
}
