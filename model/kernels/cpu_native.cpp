// Row-exact CPU kernels for the batch-invariant path, built at first use (see cpu_native.py).
//
// Each op replaces a chain of small ATen ops that Python would dispatch one by one for every
// layer of every step: the chain cost more in dispatch than in arithmetic at batch 1.
//
// Batch invariance is by construction: every (query token, head) row is computed by one
// thread, over exactly the positions it sees, in ascending order, with the same fixed-order
// reductions whatever the batch, the chunking or the thread count. The arithmetic is float32.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace {

// Dot products run in kLanes independent partial sums over the head dimension, then a fixed
// pairwise tree: vectorisable without reassociation, and the same order for every row.
constexpr int64_t kLanes = 16;

// Element i as float. bf16 widens by a shift of its bits, written so that loops over it vectorise
// (c10::BFloat16's own conversion does not); exact either way.
inline float widen(const float* p, int64_t i) { return p[i]; }
inline float widen(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }
inline float widen(const c10::BFloat16* p, int64_t i) {
  const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename T>
inline float dot(const float* q, const T* k, int64_t dim) {
  float acc[kLanes] = {0.0f};
  int64_t d = 0;
  for (; d + kLanes <= dim; d += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += q[d + l] * widen(k, d + l);
  }
  for (; d < dim; ++d) acc[d % kLanes] += q[d] * widen(k, d);
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

// exp(x) for x <= 0 (a score minus its row's max), within 2 ulp: a range reduction to
// [-ln2/2, ln2/2] and a degree-6 polynomial, written as plain arithmetic so the compiler
// vectorises a row's loop (a libm call per score was half the time of a long prefill). The
// same code for every element, so a score's weight never depends on where it sits.
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: below it the weight is 0 to float precision anyway
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = (x - n * 0.693145751953125f) - n * 1.42860682030941723212e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// A fixed-order sum: kLanes partial sums, then the same pairwise tree as dot().
inline float lane_sum(const float* x, int64_t n) {
  float acc[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += x[i + l];
  }
  for (; i < n; ++i) acc[i % kLanes] += x[i];
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

template <typename Q, typename C, typename O>
void row_attention_impl(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                        const at::Tensor& token_seq, const at::Tensor& token_ctx, at::Tensor& out,
                        double scale, int64_t window, double softcap) {
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = cache.size(2), num_kv_heads = cache.size(3);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t table_width = tables.size(1);
  const int64_t plane = cache.stride(0);  // K plane, then the V plane
  const Q* q_ptr = q.data_ptr<Q>();
  const C* k_base = cache.data_ptr<C>();
  const C* v_base = k_base + plane;
  const int32_t* table_ptr = tables.data_ptr<int32_t>();
  const int32_t* seq_ptr = token_seq.data_ptr<int32_t>();
  const int64_t* ctx_ptr = token_ctx.data_ptr<int64_t>();
  O* out_ptr = out.data_ptr<O>();
  const float fscale = static_cast<float>(scale), cap = static_cast<float>(softcap);

  // Work comes in tiles: up to kTileTokens consecutive tokens of one sequence x the query heads of
  // one KV head. A tile reads each K and V row once for all its rows (a row at a time re-read the
  // whole context from memory per row); each row still runs exactly the arithmetic it would run
  // alone, in the same order, so neither the tiling nor the threads change a bit.
  constexpr int64_t kTileTokens = 16;
  std::vector<std::array<int64_t, 3>> tiles;  // (first token, end token, kv head)
  for (int64_t t = 0; t < num_tokens;) {
    int64_t end = t + 1;
    while (end < num_tokens && end - t < kTileTokens && seq_ptr[end] == seq_ptr[t]) ++end;
    for (int64_t kv = 0; kv < num_kv_heads; ++kv) tiles.push_back({t, end, kv});
    t = end;
  }
  int64_t total_ctx = 0;
  for (int64_t t = 0; t < num_tokens; ++t) total_ctx += ctx_ptr[t];
  const int64_t work_per_tile = std::max<int64_t>(1, total_ctx * group * dim / std::max<int64_t>(1, tiles.size()));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / work_per_tile);  // short steps stay on one thread

  at::parallel_for(0, static_cast<int64_t>(tiles.size()), grain, [&](int64_t begin, int64_t end) {
    const int64_t max_rows = kTileTokens * group;
    std::vector<float> qf(max_rows * dim), acc(max_rows * dim), row_max(max_rows), total(max_rows);
    std::vector<int64_t> starts(max_rows), stops(max_rows);
    std::vector<std::vector<float>> scores(max_rows);
    for (int64_t index = begin; index < end; ++index) {
      const auto [t0, t1, kv_head] = tiles[index];
      const int64_t rows = (t1 - t0) * group;
      const int32_t* table = table_ptr + static_cast<int64_t>(seq_ptr[t0]) * table_width;
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = 0;
      for (int64_t r = 0; r < rows; ++r) {  // row r: token t0 + r / group, head kv_head * group + r % group
        const int64_t t = t0 + r / group, h = kv_head * group + r % group;
        stops[r] = ctx_ptr[t];
        starts[r] = window > 0 ? std::max<int64_t>(0, stops[r] - window) : 0;
        lo = std::min(lo, starts[r]);
        hi = std::max(hi, stops[r]);
        const Q* q_row = q_ptr + (t * num_heads + h) * dim;
        for (int64_t d = 0; d < dim; ++d) qf[r * dim + d] = widen(q_row, d);
        scores[r].resize(std::max<int64_t>(0, stops[r] - starts[r]));
        row_max[r] = -std::numeric_limits<float>::infinity();
      }
      for (int64_t p = lo; p < hi;) {  // scores, a cache block at a time (one table lookup, no division)
        const int64_t block = p / block_size, block_end = std::min(hi, (block + 1) * block_size);
        const int64_t shift = static_cast<int64_t>(table[block]) * block_size - block * block_size;  // slot - p
        for (; p < block_end; ++p) {
          const C* k = k_base + ((shift + p) * num_kv_heads + kv_head) * dim;
          for (int64_t r = 0; r < rows; ++r) {
            if (p < starts[r] || p >= stops[r]) continue;
            float s = dot(&qf[r * dim], k, dim) * fscale;
            if (cap > 0.0f) s = cap * std::tanh(s / cap);
            scores[r][p - starts[r]] = s;
            row_max[r] = std::max(row_max[r], s);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {  // softmax numerators and their sum, per row
        float* w = scores[r].data();
        const int64_t count = static_cast<int64_t>(scores[r].size());
        for (int64_t i = 0; i < count; ++i) w[i] = exp_nonpositive(w[i] - row_max[r]);  // vectorised
        total[r] = lane_sum(w, count);
      }
      std::fill(acc.begin(), acc.begin() + rows * dim, 0.0f);
      for (int64_t p = lo; p < hi;) {  // the weighted sum of V rows, in position order per row
        const int64_t block = p / block_size, block_end = std::min(hi, (block + 1) * block_size);
        const int64_t shift = static_cast<int64_t>(table[block]) * block_size - block * block_size;
        for (; p < block_end; ++p) {
          const C* v = v_base + ((shift + p) * num_kv_heads + kv_head) * dim;
          for (int64_t r = 0; r < rows; ++r) {
            if (p < starts[r] || p >= stops[r]) continue;
            const float weight = scores[r][p - starts[r]];
            float* a = &acc[r * dim];
            for (int64_t d = 0; d < dim; ++d) a[d] += weight * widen(v, d);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t t = t0 + r / group, h = kv_head * group + r % group;
        O* dst = out_ptr + (t * num_heads + h) * dim;
        const bool empty = stops[r] <= starts[r];  // a padding row sees nothing: zeros
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<O>(empty ? 0.0f : acc[r * dim + d] / total[r]);
      }
    }
  });
}

template <typename Q, typename C>
void dispatch_out(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables, const at::Tensor& seq,
                  const at::Tensor& ctx, at::Tensor& out, double scale, int64_t window, double softcap) {
  row_attention_impl<Q, C, Q>(q, cache, tables, seq, ctx, out, scale, window, softcap);
}

template <typename Q>
void dispatch_cache(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables, const at::Tensor& seq,
                    const at::Tensor& ctx, at::Tensor& out, double scale, int64_t window, double softcap) {
  switch (cache.scalar_type()) {
    case at::kFloat: return dispatch_out<Q, float>(q, cache, tables, seq, ctx, out, scale, window, softcap);
    case at::kBFloat16: return dispatch_out<Q, c10::BFloat16>(q, cache, tables, seq, ctx, out, scale, window, softcap);
    case at::kHalf: return dispatch_out<Q, c10::Half>(q, cache, tables, seq, ctx, out, scale, window, softcap);
    default: TORCH_CHECK(false, "row_attention: unsupported cache dtype ", cache.scalar_type());
  }
}

// q (T, H, D); cache (2, num_blocks, block_size, Hkv, D) contiguous; tables (S, W) int32 block ids;
// token_seq (T,) int32 each token's row of tables; token_ctx (T,) int64 positions it sees, 0 .. ctx - 1
// (0: a padding row). window > 0 keeps the last `window` of them; softcap > 0 caps the scores.
at::Tensor row_attention(const at::Tensor& q, const at::Tensor& cache, const at::Tensor& tables,
                         const at::Tensor& token_seq, const at::Tensor& token_ctx, double scale, int64_t window,
                         double softcap) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && q.size(2) == cache.size(4), "row_attention: bad shapes");
  TORCH_CHECK(q.size(1) % cache.size(3) == 0, "row_attention: heads must be a multiple of KV heads");
  TORCH_CHECK(tables.scalar_type() == at::kInt && token_seq.scalar_type() == at::kInt &&
                  token_ctx.scalar_type() == at::kLong,
              "row_attention: tables and token_seq int32, token_ctx int64");
  const at::Tensor qc = q.contiguous(), cc = cache.contiguous(), tc = tables.contiguous();
  const at::Tensor sc = token_seq.contiguous(), xc = token_ctx.contiguous();
  at::Tensor out = at::empty_like(qc);
  switch (qc.scalar_type()) {
    case at::kFloat: dispatch_cache<float>(qc, cc, tc, sc, xc, out, scale, window, softcap); break;
    case at::kBFloat16: dispatch_cache<c10::BFloat16>(qc, cc, tc, sc, xc, out, scale, window, softcap); break;
    case at::kHalf: dispatch_cache<c10::Half>(qc, cc, tc, sc, xc, out, scale, window, softcap); break;
    default: TORCH_CHECK(false, "row_attention: unsupported query dtype ", qc.scalar_type());
  }
  return out;
}

template <typename X, typename C>
void rope_write_impl(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache,
                     const at::Tensor& slots, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t rope_dim) {
  const int64_t num_tokens = qkv.size(0), row_stride = qkv.stride(0), half = rope_dim / 2;
  const int64_t plane = cache.stride(0);
  X* base = qkv.data_ptr<X>();
  const X* cos_ptr = cos.data_ptr<X>();
  const X* sin_ptr = sin.data_ptr<X>();
  C* k_cache = cache.data_ptr<C>();
  C* v_cache = k_cache + plane;
  const int64_t* slot_ptr = slots.data_ptr<int64_t>();
  const int64_t kv_row = num_kv_heads * head_dim;
  for (int64_t t = 0; t < num_tokens; ++t) {
    X* row = base + t * row_stride;
    const X* c = cos_ptr + t * rope_dim;
    const X* s = sin_ptr + t * rope_dim;
    // q heads then k heads, each rotated in place: x * cos + rotate_half(x) * sin on the leading
    // rope_dim dims (the rest pass through), in float32, rounded once.
    for (int64_t h = 0; h < num_heads + num_kv_heads; ++h) {
      X* x = row + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
        x[i] = static_cast<X>(x1 * static_cast<float>(c[i]) - x2 * static_cast<float>(s[i]));
        x[i + half] = static_cast<X>(x2 * static_cast<float>(c[i + half]) + x1 * static_cast<float>(s[i + half]));
      }
    }
    const X* k = row + num_heads * head_dim;
    const X* v = k + kv_row;
    C* k_dst = k_cache + slot_ptr[t] * kv_row;
    C* v_dst = v_cache + slot_ptr[t] * kv_row;
    for (int64_t i = 0; i < kv_row; ++i) {
      k_dst[i] = static_cast<C>(static_cast<float>(k[i]));
      v_dst[i] = static_cast<C>(static_cast<float>(v[i]));
    }
  }
}

template <typename X>
void rope_write_cache(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& cache,
                      const at::Tensor& slots, int64_t h, int64_t hkv, int64_t d, int64_t r) {
  switch (cache.scalar_type()) {
    case at::kFloat: return rope_write_impl<X, float>(qkv, cos, sin, cache, slots, h, hkv, d, r);
    case at::kBFloat16: return rope_write_impl<X, c10::BFloat16>(qkv, cos, sin, cache, slots, h, hkv, d, r);
    case at::kHalf: return rope_write_impl<X, c10::Half>(qkv, cos, sin, cache, slots, h, hkv, d, r);
    default: TORCH_CHECK(false, "rope_write_kv: unsupported cache dtype ", cache.scalar_type());
  }
}

// qkv (T, >= (H + 2 Hkv) D) rows of q | k | v heads, rotated in place; cos/sin (T, rope_dim) in qkv's
// dtype; cache (2, num_blocks, block_size, Hkv, D) contiguous; slots (T,) int64: k and v go there.
void rope_write_kv(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor cache,
                   const at::Tensor& slots, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                   int64_t rope_dim) {
  TORCH_CHECK(qkv.dim() == 2 && qkv.stride(1) == 1, "rope_write_kv: qkv must be (T, width) with unit stride");
  TORCH_CHECK(qkv.size(1) >= (num_heads + 2 * num_kv_heads) * head_dim, "rope_write_kv: qkv too narrow");
  TORCH_CHECK(cache.is_contiguous() && cache.size(3) == num_kv_heads && cache.size(4) == head_dim,
              "rope_write_kv: cache shape");
  TORCH_CHECK(rope_dim % 2 == 0 && rope_dim <= head_dim, "rope_write_kv: rope_dim");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.numel() == qkv.size(0), "rope_write_kv: slots");
  const at::Tensor c = cos.to(qkv.scalar_type()).reshape({qkv.size(0), rope_dim}).contiguous();
  const at::Tensor s = sin.to(qkv.scalar_type()).reshape({qkv.size(0), rope_dim}).contiguous();
  const at::Tensor sl = slots.contiguous();
  switch (qkv.scalar_type()) {
    case at::kFloat: return rope_write_cache<float>(qkv, c, s, cache, sl, num_heads, num_kv_heads, head_dim, rope_dim);
    case at::kBFloat16:
      return rope_write_cache<c10::BFloat16>(qkv, c, s, cache, sl, num_heads, num_kv_heads, head_dim, rope_dim);
    case at::kHalf:
      return rope_write_cache<c10::Half>(qkv, c, s, cache, sl, num_heads, num_kv_heads, head_dim, rope_dim);
    default: TORCH_CHECK(false, "rope_write_kv: unsupported dtype ", qkv.scalar_type());
  }
}


// ---------------------------------------------------------------- norms and the gated activation

template <typename T>
inline float sum_squares(const T* x, int64_t n) {
  float acc[kLanes] = {0.0f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const float v = static_cast<float>(x[i + l]);
      acc[l] += v * v;
    }
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    acc[i % kLanes] += v * v;
  }
  for (int64_t width = kLanes / 2; width > 0; width /= 2) {
    for (int64_t l = 0; l < width; ++l) acc[l] += acc[l + width];
  }
  return acc[0];
}

// One row of RMSNorm as Hugging Face computes it: the statistics in float32; offset 0 (Llama):
// x / rms rounded to the model's dtype, then times the weight; offset 1 (Gemma): x / rms * (1 + w)
// all in float32, rounded once.
template <typename T>
inline void rms_row(const T* x, const T* w, T* y, int64_t n, float eps, float offset) {
  const float inv = 1.0f / std::sqrt(sum_squares(x, n) / static_cast<float>(n) + eps);
  if (offset != 0.0f) {
    for (int64_t i = 0; i < n; ++i)
      y[i] = static_cast<T>(static_cast<float>(x[i]) * inv * (offset + static_cast<float>(w[i])));
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const T normed = static_cast<T>(static_cast<float>(x[i]) * inv);
      y[i] = static_cast<T>(static_cast<float>(w[i]) * static_cast<float>(normed));
    }
  }
}

// residual (T, n) += delta (T, n) when delta is given (rounded to the dtype, as a + b is); returns
// RMSNorm(residual). One op for the add and the norm that follows it in every pre-norm block.
at::Tensor add_rms_norm(at::Tensor residual, const std::optional<at::Tensor>& delta, const at::Tensor& weight,
                        double eps, double offset) {
  TORCH_CHECK(residual.dim() == 2 && residual.is_contiguous(), "add_rms_norm: residual must be contiguous (T, n)");
  TORCH_CHECK(weight.numel() == residual.size(1) && weight.scalar_type() == residual.scalar_type(),
              "add_rms_norm: weight");
  at::Tensor out = at::empty_like(residual);
  const at::Tensor w = weight.contiguous();
  at::Tensor d;
  if (delta.has_value()) {
    d = delta->contiguous();
    TORCH_CHECK(d.sizes() == residual.sizes() && d.scalar_type() == residual.scalar_type(), "add_rms_norm: delta");
  }
  const int64_t rows = residual.size(0), n = residual.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, residual.scalar_type(), "add_rms_norm", [&] {
    scalar_t* r = residual.data_ptr<scalar_t>();
    const scalar_t* dp = d.defined() ? d.data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = w.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / n), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* row = r + t * n;
        if (dp != nullptr) {
          for (int64_t i = 0; i < n; ++i)
            row[i] = static_cast<scalar_t>(static_cast<float>(row[i]) + static_cast<float>(dp[t * n + i]));
        }
        rms_row(row, wp, o + t * n, n, static_cast<float>(eps), static_cast<float>(offset));
      }
    });
  });
  return out;
}

// gate_up (T, 2 I) -> act(gate) * up (T, I), act = silu or tanh-approximated gelu; act(gate) is
// rounded to the dtype before the product, as the eager ops round it.
at::Tensor gated_act(const at::Tensor& gate_up, bool gelu_tanh) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.stride(1) == 1, "gated_act: (T, 2I)");
  const int64_t rows = gate_up.size(0), inter = gate_up.size(1) / 2, stride = gate_up.stride(0);
  at::Tensor out = at::empty({rows, inter}, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gate_up.scalar_type(), "gated_act", [&] {
    const scalar_t* in = gate_up.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / inter), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = in + t * stride;
        const scalar_t* u = g + inter;
        for (int64_t i = 0; i < inter; ++i) {
          const float x = static_cast<float>(g[i]);
          float a;
          if (gelu_tanh) {
            const float inner = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            a = 0.5f * x * (1.0f + std::tanh(inner));
          } else {
            a = x / (1.0f + std::exp(-x));
          }
          o[t * inter + i] = static_cast<scalar_t>(static_cast<float>(static_cast<scalar_t>(a)) * static_cast<float>(u[i]));
        }
      }
    });
  });
  return out;
}


// ---------------------------------------------------------------- linears on oneDNN-packed weights

// x (M, in) @ packed weight -> (M, out) through oneDNN's GEMM for every M: a lone row runs as the
// first of two (an expanded view), since oneDNN's M = 1 kernel sums in another order (see packed.py).
// Here rather than in Python: the expand and the slice cost two dispatches per linear otherwise.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  const bool lone = x.size(0) == 1;
  std::vector<c10::IValue> stack{lone ? x.expand({2, x.size(1)}) : x,
                                 weight,
                                 bias.has_value() ? c10::IValue(*bias) : c10::IValue(),
                                 c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()),
                                 c10::IValue()};
  op.callBoxed(&stack);
  at::Tensor y = stack[0].toTensor();
  return lone ? y.narrow(0, 0, 1) : y;
}

}  // namespace

TORCH_LIBRARY(attnserve, m) {
  m.def("row_attention(Tensor q, Tensor cache, Tensor tables, Tensor token_seq, Tensor token_ctx, float scale, "
        "int window, float softcap) -> Tensor");
  m.def("rope_write_kv(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) cache, Tensor slots, int num_heads, "
        "int num_kv_heads, int head_dim, int rope_dim) -> ()");
  m.def("add_rms_norm(Tensor(a!) residual, Tensor? delta, Tensor weight, float eps, float offset) -> Tensor");
  m.def("gated_act(Tensor gate_up, bool gelu_tanh) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(attnserve, CPU, m) {
  m.impl("row_attention", &row_attention);
  m.impl("rope_write_kv", &rope_write_kv);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("gated_act", &gated_act);
  m.impl("packed_linear", &packed_linear);
}

// The packed weight is a oneDNN tensor, whose dispatch key wins over CPU's.
TORCH_LIBRARY_IMPL(attnserve, MkldnnCPU, m) {
  m.impl("packed_linear", &packed_linear);
}
