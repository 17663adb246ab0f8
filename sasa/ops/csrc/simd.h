// Vector helpers shared by the CPU kernels: the compiler's vector extensions (``Vec``: 8 floats /
// 4 doubles, AVX2 width; ``WideVec``: AVX-512 width where available; -march=native lets the
// compiler pick the instructions), loads and stores at any alignment, and a vectorised exp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace sasa_simd {

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
typedef double d4 __attribute__((vector_size(32)));
typedef float f16 __attribute__((vector_size(64)));
typedef int32_t i16 __attribute__((vector_size(64)));
typedef double d8 __attribute__((vector_size(64)));

template <typename T> struct Vec;
template <> struct Vec<float> { using type = f8; static constexpr int64_t N = 8; };
template <> struct Vec<double> { using type = d4; static constexpr int64_t N = 4; };
// The widest registers the machine has: AVX-512's where the compiler targets it, else AVX2's
// (emulating 512-bit vectors there would double the registers a register-blocked loop needs).
template <typename T> struct WideVec;
#ifdef __AVX512F__
template <> struct WideVec<float> { using type = f16; static constexpr int64_t N = 16; };
template <> struct WideVec<double> { using type = d8; static constexpr int64_t N = 8; };
#else
template <typename T> struct WideVec : Vec<T> {};
#endif

template <typename VT, typename T> inline VT load(const T* p) {
  VT v;
  std::memcpy(&v, p, sizeof(VT));
  return v;
}
template <typename VT, typename T> inline void store(T* p, VT v) { std::memcpy(p, &v, sizeof(VT)); }
template <typename VT, typename T> inline VT splat(T s) { return VT{} + s; }

// exp(x) for x <= ~0 (logit minus max or minus log-sum-exp): Cephes' range reduction and degree-6
// polynomial (relative error ~1e-7), -inf -> 0. Vectorised by hand; libm's expf is not.
template <typename FV, typename IV> inline FV vexp_float(FV x) {
  const FV lo = splat<FV>(-87.0f);
  const IV under = x < lo;
  const FV xc = under ? lo : x;
  const IV n = __builtin_convertvector(xc * 1.44269504088896341f - 0.5f, IV);  // round to nearest for <= 0.5
  const FV nf = __builtin_convertvector(n, FV);
  const FV r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  FV p = splat<FV>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const FV scale = (FV)((n + 127) << 23);
  return under ? splat<FV>(0.0f) : p * scale;
}
inline f8 vexp(f8 x) { return vexp_float<f8, i8>(x); }
inline f16 vexp(f16 x) { return vexp_float<f16, i16>(x); }

template <typename DV> inline DV vexp_double(DV x) {  // float64 serves gradcheck and the tests, not speed
  for (int i = 0; i < int(sizeof(DV) / sizeof(double)); ++i) x[i] = std::exp(x[i]);
  return x;
}
inline d4 vexp(d4 x) { return vexp_double(x); }
inline d8 vexp(d8 x) { return vexp_double(x); }

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

template <typename VT> inline auto hsum(VT v) {
  auto s = v[0];
  for (int i = 1; i < int(sizeof(VT) / sizeof(s)); ++i) s += v[i];
  return s;
}

template <typename VT> inline auto hmax(VT v) {
  auto m = v[0];
  for (int i = 1; i < int(sizeof(VT) / sizeof(m)); ++i) m = m > v[i] ? m : v[i];
  return m;
}

}  // namespace sasa_simd
