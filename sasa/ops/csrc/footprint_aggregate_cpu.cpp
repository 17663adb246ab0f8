// CPU kernel of sasa::footprint_aggregate, the weighted sum of SAN's vector attention and ELSA's filters:
//   out[cs, y, x] = sum_n (attn[g, n, y, x] * scale[cs, n] + bias[cs, n]) * values[cs, y + di_n - c, x + dj_n - c]
// with cs = g * share + s, over the k x k footprint n = (di, dj) around each pixel, zeros outside the
// image, one weight channel g per ``share`` value channels, and a static per-channel scale and bias
// of each position (ELSA's ghost head; ones and zeros for SAN, each passed as an empty tensor). The attention weights arrive computed
// (SAN's MLP, ELSA's Hadamard attention make them); this op only replaces unfolding the values, a
// k^2-times copy of them, by reads of one zero-padded copy per (image, weight channel) task. Loops
// run along image rows so the compiler vectorises them; a backward task owns one (image, weight
// channel), so its value gradients are accumulated without races, and its scale and bias gradients
// go to a per-image slice summed at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace {

struct Sizes {
  int64_t B, G, share, C, K, KK, c, H, W, Hp, Wp;
};

Sizes checked_sizes(const at::Tensor& attn, const at::Tensor& values, const at::Tensor& scale, const at::Tensor& bias, int64_t kernel_size) {
  TORCH_CHECK(attn.dim() == 5 && values.dim() == 4, "attn must be (B, G, k*k, H, W) and values (B, C, H, W)");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1 && attn.size(2) == kernel_size * kernel_size, "attn must have k*k footprint positions, k odd");
  const int64_t B = values.size(0), C = values.size(1), H = values.size(2), W = values.size(3), G = attn.size(1);
  TORCH_CHECK(attn.size(0) == B && attn.size(3) == H && attn.size(4) == W && G > 0 && C % G == 0, "attn and values sizes disagree");
  TORCH_CHECK(attn.scalar_type() == values.scalar_type() && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble),
              "float32 or float64 only, the same for both");
  for (const at::Tensor* t : {&scale, &bias})
    TORCH_CHECK(t->numel() == 0 || (t->dim() == 2 && t->size(0) == C && t->size(1) == kernel_size * kernel_size && t->scalar_type() == values.scalar_type()),
                "scale and bias must be empty or (C, k*k) of the values' dtype");
  const int64_t c = kernel_size / 2;
  return {B, G, C / G, C, kernel_size, kernel_size * kernel_size, c, H, W, H + 2 * c, W + 2 * c};
}

// the share channels of weight channel g of image b -> zero-padded (share, Hp, Wp) planes
template <typename T> void pack(const at::Tensor& values, int64_t b, int64_t g, const Sizes& z, T* dst) {
  std::fill(dst, dst + z.share * z.Hp * z.Wp, T(0));
  const auto v = values.accessor<T, 4>();
  for (int64_t s = 0; s < z.share; ++s)
    for (int64_t y = 0; y < z.H; ++y) {
      T* row = dst + (s * z.Hp + y + z.c) * z.Wp + z.c;
      for (int64_t x = 0; x < z.W; ++x) row[x] = v[b][g * z.share + s][y][x];
    }
}

// the scale or bias of each (channel, position), ``fill`` where none is given
at::Tensor per_position(const at::Tensor& t, double fill, const Sizes& z, const at::Tensor& values) {
  return t.numel() ? t.contiguous() : at::full({z.C, z.KK}, fill, values.options());
}

at::Tensor forward(const at::Tensor& attn_, const at::Tensor& values, const at::Tensor& scale_, const at::Tensor& bias_, int64_t kernel_size) {
  const Sizes z = checked_sizes(attn_, values, scale_, bias_, kernel_size);
  const auto attn = attn_.contiguous(), scale = per_position(scale_, 1, z, values), bias = per_position(bias_, 0, z, values);
  at::Tensor out = at::zeros({z.B, z.C, z.H, z.W}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sasa_footprint_aggregate_forward", [&] {
    using T = scalar_t;
    at::parallel_for(0, z.B * z.G, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> Vp(z.share * z.Hp * z.Wp);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / z.G, g = task % z.G;
        pack<T>(values, b, g, z, Vp.data());
        const T* A = attn.data_ptr<T>() + task * z.KK * z.H * z.W;
        T* O = out.data_ptr<T>() + (b * z.C + g * z.share) * z.H * z.W;
        for (int64_t s = 0; s < z.share; ++s)
          for (int64_t y = 0; y < z.H; ++y) {
            T* __restrict__ o = O + (s * z.H + y) * z.W;
            const T* sc = scale.data_ptr<T>() + (g * z.share + s) * z.KK;
            const T* bi = bias.data_ptr<T>() + (g * z.share + s) * z.KK;
            for (int64_t n = 0; n < z.KK; ++n) {
              const T* __restrict__ a = A + (n * z.H + y) * z.W;
              const T* __restrict__ v = Vp.data() + (s * z.Hp + y + n / z.K) * z.Wp + n % z.K;
              const T m = sc[n], e = bi[n];
              for (int64_t x = 0; x < z.W; ++x) o[x] += (m * a[x] + e) * v[x];
            }
          }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad_out_, const at::Tensor& attn_, const at::Tensor& values,
                                                                    const at::Tensor& scale_, const at::Tensor& bias_, int64_t kernel_size) {
  const Sizes z = checked_sizes(attn_, values, scale_, bias_, kernel_size);
  const auto attn = attn_.contiguous(), grad_out = grad_out_.contiguous();
  const auto scale = per_position(scale_, 1, z, values), bias = per_position(bias_, 0, z, values);
  at::Tensor dattn = at::zeros(attn.sizes(), attn.options()), dvalues = at::empty({z.B, z.C, z.H, z.W}, values.options());
  const bool scaled = scale_.numel() > 0, biased = bias_.numel() > 0, per_channel = scaled || biased;
  // per image, summed at the end: tasks never share a slice
  at::Tensor dscale = at::zeros({scaled ? z.B : 0, z.C, z.KK}, values.options()), dbias = at::zeros({biased ? z.B : 0, z.C, z.KK}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sasa_footprint_aggregate_backward", [&] {
    using T = scalar_t;
    at::parallel_for(0, z.B * z.G, 1, [&](int64_t begin, int64_t end) {
      // dS, dE: the rows' products go * v * a and go * v, summed along the row at the end (a scalar sum
      // in the loop below would stop its vectorisation)
      std::vector<T> Vp(z.share * z.Hp * z.Wp), dVp(z.share * z.Hp * z.Wp), dS(per_channel ? z.KK * z.W : 0), dE(per_channel ? z.KK * z.W : 0);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / z.G, g = task % z.G;
        pack<T>(values, b, g, z, Vp.data());
        std::fill(dVp.begin(), dVp.end(), T(0));
        const T* A = attn.data_ptr<T>() + task * z.KK * z.H * z.W;
        T* dA = dattn.data_ptr<T>() + task * z.KK * z.H * z.W;
        const T* GO = grad_out.data_ptr<T>() + (b * z.C + g * z.share) * z.H * z.W;
        for (int64_t s = 0; s < z.share; ++s) {
          std::fill(dS.begin(), dS.end(), T(0));
          std::fill(dE.begin(), dE.end(), T(0));
          for (int64_t y = 0; y < z.H; ++y) {
            const T* __restrict__ go = GO + (s * z.H + y) * z.W;
            const T* sc = scale.data_ptr<T>() + (g * z.share + s) * z.KK;
            const T* bi = bias.data_ptr<T>() + (g * z.share + s) * z.KK;
            for (int64_t n = 0; n < z.KK; ++n) {
              const int64_t shift = (s * z.Hp + y + n / z.K) * z.Wp + n % z.K;
              const T* __restrict__ a = A + (n * z.H + y) * z.W;
              const T* __restrict__ v = Vp.data() + shift;
              T* __restrict__ da = dA + (n * z.H + y) * z.W;
              T* __restrict__ dv = dVp.data() + shift;
              const T m = sc[n], e = bi[n];
              for (int64_t x = 0; x < z.W; ++x) {
                da[x] += m * go[x] * v[x];
                dv[x] += (m * a[x] + e) * go[x];
              }
              if (per_channel) {
                T* __restrict__ ds = dS.data() + n * z.W;
                T* __restrict__ de = dE.data() + n * z.W;
                for (int64_t x = 0; x < z.W; ++x) {
                  ds[x] += go[x] * v[x] * a[x];
                  de[x] += go[x] * v[x];
                }
              }
            }
          }
          const auto row_sums = [&](const std::vector<T>& rows, at::Tensor& grad) {
            T* dst = grad.data_ptr<T>() + (b * z.C + g * z.share + s) * z.KK;
            for (int64_t n = 0; n < z.KK; ++n) dst[n] = std::accumulate(rows.data() + n * z.W, rows.data() + (n + 1) * z.W, T(0));
          };
          if (scaled) row_sums(dS, dscale);
          if (biased) row_sums(dE, dbias);
        }
        T* dV = dvalues.data_ptr<T>() + (b * z.C + g * z.share) * z.H * z.W;
        for (int64_t s = 0; s < z.share; ++s)
          for (int64_t y = 0; y < z.H; ++y) std::copy_n(dVp.data() + (s * z.Hp + y + z.c) * z.Wp + z.c, z.W, dV + (s * z.H + y) * z.W);
      }
    });
  });
  return {dattn, dvalues, scaled ? dscale.sum(0) : at::empty({0}, values.options()), biased ? dbias.sum(0) : at::empty({0}, values.options())};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sasa_cpu, m) {
  m.def("footprint_aggregate_forward", &forward);
  m.def("footprint_aggregate_backward", &backward);
}
