// CPU kernel of sasa::blocked_attention: blocks of queries attend over blocks of keys of the same
// (image, head), with an additive bias that factorises over the keys' two axes,
//   logit(l, (a, x)) = q_l . k_(a,x) + row_bias[l][a] + col_bias[l][x].
// Halo blocks, neighbourhood windows gathered per block of queries, and global attention with 2-D
// relative logits all have this shape; masks enter as -inf biases.
//
// q, k, v are (B, heads, channels, pixels) maps with any strides (views of one qkv projection, in
// NCHW or channels-last order); every block reads its queries and keys through index tables
// (the same for every image and head; -1 marks a padding query) and writes its outputs straight
// into the output map, so nothing is gathered into memory beforehand. A task copies one block's
// keys and values into channel rows padded to the vector width (padding keys take a -inf logit),
// then takes its queries four at a time: their logit rows (L1-resident) are built by
// register-blocked axpys over the channels, one key vector loaded per four queries; the softmax is
// exact per query (max, exp, sum) and only its log-sum-exp is kept; the values are weighted by dot
// products along the keys. The backward pass recomputes the probabilities from the log-sum-exp (as
// FlashAttention), so nothing of size queries x keys is stored. A backward task owns one (image,
// head): the key and value gradients of its overlapping blocks are added into its own planes.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "simd.h"

#include <algorithm>
#include <limits>
#include <vector>

namespace {

using namespace sasa_simd;

constexpr int64_t G = 8;  // queries per register block

// One (image, head) plane of a (B, heads, C, P) map with any strides.
template <typename T> struct Plane {
  T* p;
  int64_t sc, sp;
  Plane(const at::Tensor& t, int64_t bh) : p(t.data_ptr<T>() + (bh / t.size(1)) * t.stride(0) + (bh % t.size(1)) * t.stride(1)), sc(t.stride(2)), sp(t.stride(3)) {}
  T& at(int64_t c, int64_t pix) const { return p[c * sc + pix * sp]; }
};

struct Sizes {
  int64_t BH, d, dv, P, blocks, L, S, Sr, Sc, Sp;
};

Sizes checked_sizes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& qi, const at::Tensor& ki,
                    const at::Tensor& row_bias, const at::Tensor& col_bias, int64_t vec) {
  TORCH_CHECK(q.dim() == 4 && k.sizes() == q.sizes() && v.dim() == 4, "q, k, v must be (B, heads, channels, pixels) maps of one size");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(3) == q.size(3), "v must match q but in channels");
  TORCH_CHECK(qi.dim() == 2 && ki.dim() == 2 && qi.size(0) == ki.size(0), "query_index and key_index must be (blocks, L) and (blocks, S)");
  TORCH_CHECK(qi.scalar_type() == at::kLong && ki.scalar_type() == at::kLong, "index tables must be int64");
  const int64_t BH = q.size(0) * q.size(1), blocks = qi.size(0), L = qi.size(1), S = ki.size(1);
  TORCH_CHECK(row_bias.dim() == 3 && col_bias.dim() == 3 && row_bias.size(0) == BH * blocks && col_bias.size(0) == BH * blocks &&
                  row_bias.size(1) == L && col_bias.size(1) == L,
              "row_bias and col_bias must be (B * heads * blocks, L, Sr) and (B * heads * blocks, L, Sc)");
  const int64_t Sr = row_bias.size(2), Sc = col_bias.size(2);
  TORCH_CHECK(Sr * Sc == S, "row_bias and col_bias must factorise each block's S keys: Sr * Sc == S");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "float32 or float64 only");
  const int64_t P = q.size(3);
  const auto in_range = [P](const at::Tensor& t, int64_t lo) { return t.numel() == 0 || (t.min().item<int64_t>() >= lo && t.max().item<int64_t>() < P); };
  TORCH_CHECK(in_range(qi, -1) && in_range(ki, 0), "index tables must hold pixel indices (and -1 for padding queries)");
  return {BH, q.size(2), v.size(2), P, blocks, L, S, Sr, Sc, round_up(S, vec)};
}

// one block's keys (or values), channel c of its s-th key at dst[c * Sp + s], zeros in the padding
template <typename T> void pack(const Plane<T>& src, int64_t C, const int64_t* keys, const Sizes& z, T* dst) {
  for (int64_t c = 0; c < C; ++c) {
    T* row = dst + c * z.Sp;
    for (int64_t s = 0; s < z.S; ++s) row[s] = src.at(c, keys[s]);
    std::fill(row + z.S, row + z.Sp, T(0));
  }
}

// Four queries at a time: their pixels (the last group repeats its last query; padding queries
// and repeats read zeros where ``zero_padding``), their channels gathered into [j][c].
struct Group {
  int64_t pix[G];
  bool real[G];
};

inline Group group(const int64_t* queries, int64_t l0, int64_t L) {
  Group g;
  const int64_t count = std::min(G, L - l0);
  for (int64_t j = 0; j < G; ++j) {
    g.pix[j] = queries[l0 + std::min(j, count - 1)];
    g.real[j] = j < count && g.pix[j] >= 0;
  }
  return g;
}

template <typename T> void gather(const Group& g, const Plane<T>& src, int64_t C, T* dst) {
  for (int64_t j = 0; j < G; ++j)
    for (int64_t c = 0; c < C; ++c) dst[j * C + c] = g.real[j] ? src.at(c, g.pix[j]) : T(0);
}

// The row-wise products below work on keys [s0, s1) of rows of stride Sp: the backward pass walks
// the keys in chunks of KEYS_PER_CHUNK, so the chunk of every row it touches (logits,
// probabilities, their gradients, keys, values and their gradients) stays in L1 cache; whole rows
// of global attention (784 keys) would stream from L2 once per channel pair.
constexpr int64_t KEYS_PER_CHUNK = 128;

// out[j][s] += sum_c coef[j][c] M[c][s] for the group's rows (logits: coef = q, M = k; dP: coef =
// dout, M = v). Two key vectors per step: each coefficient loaded once feeds two FMAs.
template <typename T> void combine(const Sizes& z, const T* coef, const T* M, int64_t C, T* out, int64_t s0, int64_t s1) {
  using VT = typename WideVec<T>::type;
  constexpr int64_t N = WideVec<T>::N;
  int64_t s = s0;
  for (; s + 2 * N <= s1; s += 2 * N) {
    VT a0[G], a1[G];
    for (int64_t j = 0; j < G; ++j) a0[j] = load<VT>(out + j * z.Sp + s), a1[j] = load<VT>(out + j * z.Sp + s + N);
    for (int64_t c = 0; c < C; ++c) {
      const VT m0 = load<VT>(M + c * z.Sp + s), m1 = load<VT>(M + c * z.Sp + s + N);
      for (int64_t j = 0; j < G; ++j) {
        const T w = coef[j * C + c];  // a scalar operand: one broadcast load per FMA pair
        a0[j] += w * m0;
        a1[j] += w * m1;
      }
    }
    for (int64_t j = 0; j < G; ++j) store(out + j * z.Sp + s, a0[j]), store(out + j * z.Sp + s + N, a1[j]);
  }
  for (; s < s1; s += N) {
    VT a[G];
    for (int64_t j = 0; j < G; ++j) a[j] = load<VT>(out + j * z.Sp + s);
    for (int64_t c = 0; c < C; ++c) {
      const VT m = load<VT>(M + c * z.Sp + s);
      for (int64_t j = 0; j < G; ++j) a[j] += coef[j * C + c] * m;
    }
    for (int64_t j = 0; j < G; ++j) store(out + j * z.Sp + s, a[j]);
  }
}

// the group's bias rows: row_bias[l][a] + col_bias[l][x] at key a * Sc + x, -inf for padding keys
template <typename T> void bias_rows(const Sizes& z, int64_t l0, const T* rb, const T* cb, T* Lg) {
  for (int64_t j = 0; j < G; ++j) {
    const int64_t l = std::min(l0 + j, z.L - 1);
    const T* r = rb + l * z.Sr;
    const T* c = cb + l * z.Sc;
    T* __restrict__ row = Lg + j * z.Sp;
    for (int64_t a = 0; a < z.Sr; ++a) {
      const T ra = r[a];
      for (int64_t x = 0; x < z.Sc; ++x) row[a * z.Sc + x] = ra + c[x];
    }
    std::fill(row + z.S, row + z.Sp, -std::numeric_limits<T>::infinity());
  }
}

// acc[j][c] += rows[j][s] * M[c][s] over the keys, as vectors (summed across lanes by the caller):
// two channels per pass so each row vector loaded feeds two FMAs
template <typename T, typename VT> void dots(const Sizes& z, const T* rows, const T* M, int64_t C, VT* acc, int64_t s0, int64_t s1) {
  constexpr int64_t N = WideVec<T>::N;
  int64_t c = 0;
  for (; c + 2 <= C; c += 2) {
    VT a0[G], a1[G];
    for (int64_t j = 0; j < G; ++j) a0[j] = acc[j * C + c], a1[j] = acc[j * C + c + 1];
    const T *m0 = M + c * z.Sp, *m1 = m0 + z.Sp;
    for (int64_t s = s0; s < s1; s += N) {
      const VT v0 = load<VT>(m0 + s), v1 = load<VT>(m1 + s);
      for (int64_t j = 0; j < G; ++j) {
        const VT r = load<VT>(rows + j * z.Sp + s);
        a0[j] += r * v0;
        a1[j] += r * v1;
      }
    }
    for (int64_t j = 0; j < G; ++j) acc[j * C + c] = a0[j], acc[j * C + c + 1] = a1[j];
  }
  for (; c < C; ++c) {
    const T* m = M + c * z.Sp;
    for (int64_t s = s0; s < s1; s += N) {
      const VT mv = load<VT>(m + s);
      for (int64_t j = 0; j < G; ++j) acc[j * C + c] += load<VT>(rows + j * z.Sp + s) * mv;
    }
  }
}

// M[c][s] += sum_j coef[j][c] rows[j][s]: gradients of the keys and values. Two channels and two
// key vectors per step: four independent sums over the group's rows (one sum would wait out the
// FMA latency G times per vector), each row vector loaded once for two FMAs.
template <typename T> void axpys(const Sizes& z, const T* coef, const T* rows, int64_t C, T* M, int64_t s0, int64_t s1) {
  using VT = typename WideVec<T>::type;
  constexpr int64_t N = WideVec<T>::N;
  for (int64_t c = 0; c < C; c += 2) {
    const bool pair = c + 1 < C;
    T *m0 = M + c * z.Sp, *m1 = pair ? m0 + z.Sp : m0;
    VT w0[G], w1[G];  // the coefficients broadcast once, not once per key vector
    for (int64_t j = 0; j < G; ++j) w0[j] = splat<VT>(coef[j * C + c]), w1[j] = splat<VT>(pair ? coef[j * C + c + 1] : T(0));
    int64_t s = s0;
    for (; s + 2 * N <= s1; s += 2 * N) {
      VT a00 = load<VT>(m0 + s), a01 = load<VT>(m0 + s + N), a10 = {}, a11 = {};
      for (int64_t j = 0; j < G; ++j) {
        const VT r0 = load<VT>(rows + j * z.Sp + s), r1 = load<VT>(rows + j * z.Sp + s + N);
        a00 += w0[j] * r0, a01 += w0[j] * r1, a10 += w1[j] * r0, a11 += w1[j] * r1;
      }
      store(m0 + s, a00), store(m0 + s + N, a01);
      if (pair) store(m1 + s, load<VT>(m1 + s) + a10), store(m1 + s + N, load<VT>(m1 + s + N) + a11);
    }
    for (; s < s1; s += N) {
      VT a0 = load<VT>(m0 + s), a1 = {};
      for (int64_t j = 0; j < G; ++j) {
        const VT r = load<VT>(rows + j * z.Sp + s);
        a0 += w0[j] * r, a1 += w1[j] * r;
      }
      store(m0 + s, a0);
      if (pair) store(m1 + s, load<VT>(m1 + s) + a1);
    }
  }
}

at::Tensor zeros_map(const at::Tensor& like, int64_t C) {
  return at::zeros({like.size(0), like.size(1), C, like.size(3)}, like.options());
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& query_index,
                                           const at::Tensor& key_index, const at::Tensor& row_bias_, const at::Tensor& col_bias_) {
  const auto rb_all = row_bias_.to(q.scalar_type()).contiguous(), cb_all = col_bias_.to(q.scalar_type()).contiguous();
  const auto qi = query_index.contiguous(), ki = key_index.contiguous();
  const int64_t vec = q.scalar_type() == at::kFloat ? WideVec<float>::N : WideVec<double>::N;
  const Sizes z = checked_sizes(q, k, v, qi, ki, rb_all, cb_all, vec);
  at::Tensor out = at::zeros({q.size(0), q.size(1), z.dv, z.P}, q.options()), lse = at::empty({z.BH * z.blocks, z.L}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_blocked_attention_forward", [&] {
    using T = scalar_t;
    using VT = typename WideVec<T>::type;
    constexpr int64_t N = WideVec<T>::N;
    at::parallel_for(0, z.BH * z.blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> Kp(z.d * z.Sp), Vp(z.dv * z.Sp), Lg(G * z.Sp), Qg(G * z.d);
      std::vector<VT> acc(G * z.dv);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t bh = p / z.blocks, block = p % z.blocks;
        const int64_t* queries = qi.data_ptr<int64_t>() + block * z.L;
        pack(Plane<T>(k, bh), z.d, ki.data_ptr<int64_t>() + block * z.S, z, Kp.data());
        pack(Plane<T>(v, bh), z.dv, ki.data_ptr<int64_t>() + block * z.S, z, Vp.data());
        const Plane<T> Q(q, bh), O(out, bh);
        const T* rb = rb_all.data_ptr<T>() + p * z.L * z.Sr;
        const T* cb = cb_all.data_ptr<T>() + p * z.L * z.Sc;
        T* lse_p = lse.data_ptr<T>() + p * z.L;
        for (int64_t l0 = 0; l0 < z.L; l0 += G) {
          const Group g = group(queries, l0, z.L);
          gather(g, Q, z.d, Qg.data());
          bias_rows(z, l0, rb, cb, Lg.data());
          combine(z, Qg.data(), Kp.data(), z.d, Lg.data(), 0, z.Sp);
          T inv[G];
          for (int64_t j = 0; j < G; ++j) {
            T* row = Lg.data() + j * z.Sp;
            VT mv = splat<VT>(-std::numeric_limits<T>::infinity());
            for (int64_t s = 0; s < z.Sp; s += N) mv = mv > load<VT>(row + s) ? mv : load<VT>(row + s);
            const T m = hmax(mv);
            VT sum = splat<VT>(T(0));
            for (int64_t s = 0; s < z.Sp; s += N) {
              const VT e = vexp(load<VT>(row + s) - m);
              store(row + s, e);
              sum += e;
            }
            const T total = hsum(sum);
            inv[j] = T(1) / total;
            if (l0 + j < z.L) lse_p[l0 + j] = m + std::log(total);
          }
          std::fill(acc.begin(), acc.end(), VT{});
          for (int64_t s0 = 0; s0 < z.Sp; s0 += KEYS_PER_CHUNK) dots<T>(z, Lg.data(), Vp.data(), z.dv, acc.data(), s0, std::min(z.Sp, s0 + KEYS_PER_CHUNK));
          for (int64_t j = 0; j < G; ++j)
            if (g.real[j])
              for (int64_t c = 0; c < z.dv; ++c) O.at(c, g.pix[j]) = hsum(acc[j * z.dv + c]) * inv[j];
        }
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& query_index,
    const at::Tensor& key_index, const at::Tensor& row_bias_, const at::Tensor& col_bias_, const at::Tensor& out, const at::Tensor& lse_) {
  const auto rb_all = row_bias_.to(q.scalar_type()).contiguous(), cb_all = col_bias_.to(q.scalar_type()).contiguous();
  const auto qi = query_index.contiguous(), ki = key_index.contiguous(), lse = lse_.contiguous();
  const int64_t vec = q.scalar_type() == at::kFloat ? WideVec<float>::N : WideVec<double>::N;
  const Sizes z = checked_sizes(q, k, v, qi, ki, rb_all, cb_all, vec);
  at::Tensor dq = zeros_map(q, z.d), dk = zeros_map(q, z.d), dv = zeros_map(q, z.dv);
  at::Tensor drow = at::empty(rb_all.sizes(), q.options()), dcol = at::empty(cb_all.sizes(), q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sasa_blocked_attention_backward", [&] {
    using T = scalar_t;
    using VT = typename WideVec<T>::type;
    constexpr int64_t N = WideVec<T>::N;
    at::parallel_for(0, z.BH, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> Kp(z.d * z.Sp), Vp(z.dv * z.Sp), dKp(z.d * z.Sp), dVp(z.dv * z.Sp);
      std::vector<T> Pr(G * z.Sp), DS(G * z.Sp), Qg(G * z.d), Gg(G * z.dv), Og(G * z.dv);
      std::vector<VT> dq_acc(G * z.d);
      for (int64_t bh = begin; bh < end; ++bh) {
        const Plane<T> Q(q, bh), GO(grad_out, bh), O(out, bh), dQ(dq, bh), dK(dk, bh), dV(dv, bh);
        for (int64_t block = 0; block < z.blocks; ++block) {
          const int64_t p = bh * z.blocks + block;
          const int64_t* queries = qi.data_ptr<int64_t>() + block * z.L;
          const int64_t* keys = ki.data_ptr<int64_t>() + block * z.S;
          pack(Plane<T>(k, bh), z.d, keys, z, Kp.data());
          pack(Plane<T>(v, bh), z.dv, keys, z, Vp.data());
          std::fill(dKp.begin(), dKp.end(), T(0));
          std::fill(dVp.begin(), dVp.end(), T(0));
          const T* lse_p = lse.data_ptr<T>() + p * z.L;
          const T* rb = rb_all.data_ptr<T>() + p * z.L * z.Sr;
          const T* cb = cb_all.data_ptr<T>() + p * z.L * z.Sc;
          T* dR = drow.data_ptr<T>() + p * z.L * z.Sr;
          T* dC = dcol.data_ptr<T>() + p * z.L * z.Sc;
          for (int64_t l0 = 0; l0 < z.L; l0 += G) {
            // padding queries and repeats get zero q and zero output gradient: they add nothing
            const Group g = group(queries, l0, z.L);
            gather(g, Q, z.d, Qg.data());
            gather(g, GO, z.dv, Gg.data());
            gather(g, O, z.dv, Og.data());
            T delta[G], lse_g[G];  // sum_s p_s (dout . v_s) = dout . out
            for (int64_t j = 0; j < G; ++j) {
              delta[j] = 0;
              for (int64_t c = 0; c < z.dv; ++c) delta[j] += Gg[j * z.dv + c] * Og[j * z.dv + c];
              lse_g[j] = lse_p[std::min(l0 + j, z.L - 1)];
            }
            bias_rows(z, l0, rb, cb, Pr.data());
            std::fill(DS.begin(), DS.end(), T(0));
            std::fill(dq_acc.begin(), dq_acc.end(), VT{});
            for (int64_t s0 = 0; s0 < z.Sp; s0 += KEYS_PER_CHUNK) {
              const int64_t s1 = std::min(z.Sp, s0 + KEYS_PER_CHUNK);
              combine(z, Qg.data(), Kp.data(), z.d, Pr.data(), s0, s1);   // logits
              combine(z, Gg.data(), Vp.data(), z.dv, DS.data(), s0, s1);  // dP[j][s] = dout_j . v_s
              // probabilities from the saved log-sum-exp; ds = p (dP - dout . out)
              for (int64_t j = 0; j < G; ++j) {
                T* pr = Pr.data() + j * z.Sp;
                T* ds = DS.data() + j * z.Sp;
                for (int64_t s = s0; s < s1; s += N) {
                  const VT prob = vexp(load<VT>(pr + s) - lse_g[j]);
                  store(pr + s, prob);
                  store(ds + s, prob * (load<VT>(ds + s) - delta[j]));
                }
              }
              dots<T>(z, DS.data(), Kp.data(), z.d, dq_acc.data(), s0, s1);
              axpys(z, Qg.data(), DS.data(), z.d, dKp.data(), s0, s1);
              axpys(z, Gg.data(), Pr.data(), z.dv, dVp.data(), s0, s1);
            }
            for (int64_t j = 0; j < G && l0 + j < z.L; ++j) {
              if (g.real[j])
                for (int64_t c = 0; c < z.d; ++c) dQ.at(c, g.pix[j]) = hsum(dq_acc[j * z.d + c]);
              // bias gradients: ds summed over the other axis of the keys
              const T* __restrict__ ds = DS.data() + j * z.Sp;
              T* __restrict__ dc = dC + (l0 + j) * z.Sc;
              std::fill(dc, dc + z.Sc, T(0));
              for (int64_t a = 0; a < z.Sr; ++a)
                for (int64_t x = 0; x < z.Sc; ++x) dc[x] += ds[a * z.Sc + x];
              for (int64_t a = 0; a < z.Sr; ++a) {
                T sum[4] = {};  // independent partial sums: a serial chain of adds would stall on latency
                int64_t x = 0;
                for (; x + 4 <= z.Sc; x += 4)
                  for (int i = 0; i < 4; ++i) sum[i] += ds[a * z.Sc + x + i];
                for (; x < z.Sc; ++x) sum[0] += ds[a * z.Sc + x];
                dR[(l0 + j) * z.Sr + a] = (sum[0] + sum[1]) + (sum[2] + sum[3]);
              }
            }
          }
          // blocks overlap: add this block's key and value gradients into the planes
          for (int64_t c = 0; c < z.d; ++c)
            for (int64_t s = 0; s < z.S; ++s) dK.at(c, keys[s]) += dKp[c * z.Sp + s];
          for (int64_t c = 0; c < z.dv; ++c)
            for (int64_t s = 0; s < z.S; ++s) dV.at(c, keys[s]) += dVp[c * z.Sp + s];
        }
      }
    });
  });
  return {dq, dk, dv, drow.to(row_bias_.scalar_type()), dcol.to(col_bias_.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sasa_cpu, m) {
  m.def("blocked_attention_forward", &forward);
  m.def("blocked_attention_backward", &backward);
}
