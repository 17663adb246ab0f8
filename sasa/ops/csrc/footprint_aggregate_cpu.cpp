// CPU kernel of sasa::footprint_aggregate, the weighted sum of SAN's vector attention:
//   out[g * share + s, y, x] = sum_n attn[g, n, y, x] * values[g * share + s, y + di_n - c, x + dj_n - c]
// over the k x k footprint n = (di, dj) around each pixel, zeros outside the image, one weight
// channel g per ``share`` value channels. The attention weights arrive computed (SAN's MLP makes
// them); this op only replaces unfolding the values, a k^2-times copy of them, by reads of one
// zero-padded copy per (image, weight channel) task. Loops run along image rows so the compiler
// vectorises them; a backward task owns one (image, weight channel), so its value gradients are
// accumulated without races.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

namespace {

struct Sizes {
  int64_t B, G, share, C, K, KK, c, H, W, Hp, Wp;
};

Sizes checked_sizes(const at::Tensor& attn, const at::Tensor& values, int64_t kernel_size) {
  TORCH_CHECK(attn.dim() == 5 && values.dim() == 4, "attn must be (B, G, k*k, H, W) and values (B, C, H, W)");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1 && attn.size(2) == kernel_size * kernel_size, "attn must have k*k footprint positions, k odd");
  const int64_t B = values.size(0), C = values.size(1), H = values.size(2), W = values.size(3), G = attn.size(1);
  TORCH_CHECK(attn.size(0) == B && attn.size(3) == H && attn.size(4) == W && G > 0 && C % G == 0, "attn and values sizes disagree");
  TORCH_CHECK(attn.scalar_type() == values.scalar_type() && (values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble),
              "float32 or float64 only, the same for both");
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

at::Tensor forward(const at::Tensor& attn_, const at::Tensor& values, int64_t kernel_size) {
  const Sizes z = checked_sizes(attn_, values, kernel_size);
  const auto attn = attn_.contiguous();
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
            for (int64_t n = 0; n < z.KK; ++n) {
              const T* __restrict__ a = A + (n * z.H + y) * z.W;
              const T* __restrict__ v = Vp.data() + (s * z.Hp + y + n / z.K) * z.Wp + n % z.K;
              for (int64_t x = 0; x < z.W; ++x) o[x] += a[x] * v[x];
            }
          }
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_out_, const at::Tensor& attn_, const at::Tensor& values, int64_t kernel_size) {
  const Sizes z = checked_sizes(attn_, values, kernel_size);
  const auto attn = attn_.contiguous(), grad_out = grad_out_.contiguous();
  at::Tensor dattn = at::zeros(attn.sizes(), attn.options()), dvalues = at::empty({z.B, z.C, z.H, z.W}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sasa_footprint_aggregate_backward", [&] {
    using T = scalar_t;
    at::parallel_for(0, z.B * z.G, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> Vp(z.share * z.Hp * z.Wp), dVp(z.share * z.Hp * z.Wp);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / z.G, g = task % z.G;
        pack<T>(values, b, g, z, Vp.data());
        std::fill(dVp.begin(), dVp.end(), T(0));
        const T* A = attn.data_ptr<T>() + task * z.KK * z.H * z.W;
        T* dA = dattn.data_ptr<T>() + task * z.KK * z.H * z.W;
        const T* GO = grad_out.data_ptr<T>() + (b * z.C + g * z.share) * z.H * z.W;
        for (int64_t s = 0; s < z.share; ++s)
          for (int64_t y = 0; y < z.H; ++y) {
            const T* __restrict__ go = GO + (s * z.H + y) * z.W;
            for (int64_t n = 0; n < z.KK; ++n) {
              const int64_t shift = (s * z.Hp + y + n / z.K) * z.Wp + n % z.K;
              const T* __restrict__ a = A + (n * z.H + y) * z.W;
              const T* __restrict__ v = Vp.data() + shift;
              T* __restrict__ da = dA + (n * z.H + y) * z.W;
              T* __restrict__ dv = dVp.data() + shift;
              for (int64_t x = 0; x < z.W; ++x) {
                da[x] += go[x] * v[x];
                dv[x] += go[x] * a[x];
              }
            }
          }
        T* dV = dvalues.data_ptr<T>() + (b * z.C + g * z.share) * z.H * z.W;
        for (int64_t s = 0; s < z.share; ++s)
          for (int64_t y = 0; y < z.H; ++y) std::copy_n(dVp.data() + (s * z.Hp + y + z.c) * z.Wp + z.c, z.W, dV + (s * z.H + y) * z.W);
      }
    });
  });
  return {dattn, dvalues};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sasa_cpu, m) {
  m.def("footprint_aggregate_forward", &forward);
  m.def("footprint_aggregate_backward", &backward);
}
