// The deformable attention's weighted gather on the CPU, float32: two XLA FFI custom calls.
//
//   forward   out[b, q, h, :]    = sum over k of weight[b, q, h, k] * value[b, index[b, q, h, k], g(h), :]
//   backward  d_value[b, t, g, :] = sum over (q, h, k) with index[b, q, h, k] == t, g(h) == g of
//                                   weight[b, q, h, k] * d_out[b, q, h, :]
//             d_weight[b, q, h, k] = <value[b, index[b, q, h, k], g(h), :], d_out[b, q, h, :]>
//
// value is (batch, tokens, groups, channels) with groups == heads (head h reads its own channels, the projected
// value split into heads) or groups == 1 (every head reads the same rows, the unprojected memory); index and weight
// are (batch, queries, heads, taps), a tap being one bilinear corner (or rounded pixel) of one sampling point, its
// weight the point's attention weight times the corner's bilinear weight (rtdetr_jax/modeling/deformable.py). An
// index outside [0, tokens) is clamped into it, as `take_along_axis(mode="clip")` does.
//
// Why: XLA:CPU runs the same sum as gathers that write every tap's row out before summing them, and its gradient
// as a scatter-add into a zeroed buffer plus the products again. Here each row is read once, where it lies, and
// summed in registers. rtdetr_jax uses the forward for the CPU's inference (benchmarks/README.md has the
// measurements, also of the gradient in the training step, where it is not used).
//
// Exactness and determinism: each output element is one task's sum in a fixed order (taps in order; for d_value,
// queries, heads and taps in order; each d_weight a 16-lane dot product added up in a fixed tree, `dot`), whatever
// the thread count: bitwise the same with one thread or many.
//
// Threads: asynchronous (an FFI future), as cpu_kernel_gradient.cc: the work is split into independent tasks on
// XLA's intra-op pool (`Launch`, cpu_tasks.h), each writing its own part of the outputs; the task that ends last
// completes the future.
// The forward's tasks own ranges of (batch, query, head) rows. The backward's d_value tasks own one (batch, group)
// pair each, so no two tasks add into one row; its d_weight tasks own ranges of rows, as the forward's.
//
// Built once per machine by rtdetr_jax/ops/native.py with the host compiler at -O3 -march=native.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_tasks.h"
#include "cpu_vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rtdetr_jax::Failed;
using rtdetr_jax::kWidth;
using rtdetr_jax::Launch;
using rtdetr_jax::load;
using rtdetr_jax::ShapeText;
using rtdetr_jax::store;
using rtdetr_jax::V16;

constexpr double kTaskFloats = 2e6;  // multiply-adds per forward task: ~1 ms of gathers on a core
constexpr int64_t kMaxTasks = 64;
// o[:n] += w * v[:n]
inline void add_scaled(float* o, float w, const float* v, int64_t n) {
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) store(o + c, load(o + c) + w * load(v + c));
  for (; c < n; c++) o[c] += w * v[c];
}

// <a[:n], b[:n]> as 16 partial sums (element c into partial c % 16, in order), then added pairwise in a fixed
// tree (partial j + partial j + 8, then j + 4, j + 2, j + 1): the same rounding whatever the vector width (on CPUs
// with FMA instructions), and a short chain of dependent additions.
inline float dot(const float* a, const float* b, int64_t n) {
  V16 acc = V16{};
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) acc += load(a + c) * load(b + c);
  float p[kWidth];
  store(p, acc);
  for (int j = 0; c < n; c++, j++) p[j] += a[c] * b[c];
  for (int half = kWidth / 2; half > 0; half /= 2)
    for (int j = 0; j < half; j++) p[j] += p[j + half];
  return p[0];
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define RTDETR_SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#endif

// out[i] = <rows[i][:n], b[:n]> for 16 rows, each summed exactly as `dot` does (the pairwise tree runs on all 16 at
// once, as vector shuffles and additions, where the compiler has __builtin_shufflevector).
inline void dot16(const float* const* rows, const float* b, int64_t n, float* out) {
#ifdef RTDETR_SHUFFLE
  if (n % kWidth == 0) {
    V16 a[kWidth];
    for (int i = 0; i < kWidth; i++) a[i] = V16{};
    for (int64_t c = 0; c < n; c += kWidth) {
      const V16 bc = load(b + c);
      for (int i = 0; i < kWidth; i++) a[i] += load(rows[i] + c) * bc;
    }
    // lanes j and j + 8 of rows i and i + 8, then j and j + 4, ...: after the last step lane l holds row l's sum
    for (int i = 0; i < 8; i++)
      a[i] = RTDETR_SHUFFLE(a[i], a[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
             RTDETR_SHUFFLE(a[i], a[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)
      a[i] = RTDETR_SHUFFLE(a[i], a[i + 4], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
             RTDETR_SHUFFLE(a[i], a[i + 4], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)
      a[i] = RTDETR_SHUFFLE(a[i], a[i + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
             RTDETR_SHUFFLE(a[i], a[i + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
    store(out, RTDETR_SHUFFLE(a[0], a[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
                   RTDETR_SHUFFLE(a[0], a[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31));
    return;
  }
#endif
  for (int i = 0; i < kWidth; i++) out[i] = dot(rows[i], b, n);
}

struct Shape {
  int64_t b, t, g, c;  // value (batch, tokens, groups, channels)
  int64_t q, h, k;     // index / weight (batch, queries, heads, taps)
};

inline int64_t clamp_index(int32_t i, int64_t tokens) {
  return i < 0 ? 0 : (i >= tokens ? tokens - 1 : static_cast<int64_t>(i));
}

// The value row that (b, head h) reads at token t.
inline const float* value_row(const Shape& s, const float* value, int64_t b, int64_t t, int64_t h) {
  return value + ((b * s.t + t) * s.g + (s.g == 1 ? 0 : h)) * s.c;
}

// o[c0 : c0 + 16 * NV] = sum over the taps of w[k] * (row k)[c0 : ...], summed in registers, taps in order.
template <int NV>
inline void sum_taps(const float* const* rows, const float* w, int64_t taps, int64_t c0, float* o) {
  V16 acc[NV];
  for (int j = 0; j < NV; j++) acc[j] = V16{};
  for (int64_t k = 0; k < taps; k++) {
    const float* v = rows[k] + c0;
    for (int j = 0; j < NV; j++) acc[j] += w[k] * load(v + j * kWidth);
  }
  for (int j = 0; j < NV; j++) store(o + c0 + j * kWidth, acc[j]);
}

// o[:c] = sum over the taps of w[k] * rows[k][:c].
inline void sum_row(const float* const* rows, const float* w, int64_t taps, int64_t c, float* o) {
  int64_t c0 = 0;
  for (; c0 + 4 * kWidth <= c; c0 += 4 * kWidth) sum_taps<4>(rows, w, taps, c0, o);
  for (; c0 + 2 * kWidth <= c; c0 += 2 * kWidth) sum_taps<2>(rows, w, taps, c0, o);
  for (; c0 + kWidth <= c; c0 += kWidth) sum_taps<1>(rows, w, taps, c0, o);
  for (; c0 < c; c0++) {  // channels past the last whole vector
    float sum = 0.0f;
    for (int64_t k = 0; k < taps; k++) sum += w[k] * rows[k][c0];
    o[c0] = sum;
  }
}

// out rows [begin, end) of the flattened (batch * queries * heads).
void sample_rows(const Shape& s, const float* value, const int32_t* index, const float* weight, float* out,
                 int64_t begin, int64_t end) {
  std::vector<const float*> rows(s.k);
  for (int64_t r = begin; r < end; r++) {
    const int64_t b = r / (s.q * s.h), h = r % s.h;
    const int32_t* idx = index + r * s.k;
    for (int64_t k = 0; k < s.k; k++) rows[k] = value_row(s, value, b, clamp_index(idx[k], s.t), h);
    sum_row(rows.data(), weight + r * s.k, s.k, s.c, out + r * s.c);
  }
}

// d_value for one (batch b, group g) pair: every (query, head, tap) of the heads that read group g, in order. The
// pair's rows of d_value lie a (groups * channels) stride apart, 1 KiB for the r18vd decoder: added into there at
// random, they map to a sixteenth of the L2 cache's sets and a page each, and the kernel ran ~2x slower than into
// the same rows packed. So the gradient is summed into a packed buffer and copied out at the end, in token order.
void value_grad_pair(const Shape& s, const int32_t* index, const float* weight, const float* d_out, float* d_value,
                     int64_t b, int64_t g) {
  std::vector<float> grad(s.t * s.c, 0.0f);
  const int64_t h_begin = s.g == 1 ? 0 : g, h_end = s.g == 1 ? s.h : g + 1;
  for (int64_t q = 0; q < s.q; q++) {
    for (int64_t h = h_begin; h < h_end; h++) {
      const int64_t r = (b * s.q + q) * s.h + h;
      const int32_t* idx = index + r * s.k;
      const float* w = weight + r * s.k;
      const float* go = d_out + r * s.c;
      for (int64_t k = 0; k < s.k; k++) add_scaled(&grad[clamp_index(idx[k], s.t) * s.c], w[k], go, s.c);
    }
  }
  float* dvb = d_value + (b * s.t * s.g + g) * s.c;
  for (int64_t t = 0; t < s.t; t++) std::memcpy(dvb + t * s.g * s.c, &grad[t * s.c], s.c * sizeof(float));
}

// d_weight for rows [begin, end) of the flattened (batch * queries * heads).
void weight_grad_rows(const Shape& s, const float* value, const int32_t* index, const float* d_out, float* d_weight,
                      int64_t begin, int64_t end) {
  std::vector<const float*> rows(s.k);
  for (int64_t r = begin; r < end; r++) {
    const int64_t b = r / (s.q * s.h), h = r % s.h;
    const int32_t* idx = index + r * s.k;
    const float* go = d_out + r * s.c;
    float* dw = d_weight + r * s.k;
    for (int64_t k = 0; k < s.k; k++) rows[k] = value_row(s, value, b, clamp_index(idx[k], s.t), h);
    int64_t k = 0;
    for (; k + kWidth <= s.k; k += kWidth) dot16(&rows[k], go, s.c, dw + k);
    for (; k < s.k; k++) dw[k] = dot(rows[k], go, s.c);
  }
}

// Tasks over the rows of (batch * queries * heads): ~kTaskFloats multiply-adds each, at most kMaxTasks.
int64_t row_task_count(const Shape& s) {
  const int64_t rows = s.b * s.q * s.h;
  const double work = static_cast<double>(rows) * s.k * s.c;
  return std::min<int64_t>({kMaxTasks, rows, std::max<int64_t>(1, static_cast<int64_t>(work / kTaskFloats))});
}

// Shapes from value (b, t, g, c) and index (b, q, h, k); false when they do not fit together (with weight).
bool read_shape(ffi::Buffer<ffi::F32>& value, ffi::Buffer<ffi::S32>& index, ffi::Buffer<ffi::F32>& weight,
                Shape* s) {
  const auto vd = value.dimensions(), id = index.dimensions(), wd = weight.dimensions();
  if (vd.size() != 4 || id.size() != 4 || wd.size() != 4) return false;
  *s = Shape{vd[0], vd[1], vd[2], vd[3], id[1], id[2], id[3]};
  for (int i = 0; i < 4; i++)
    if (id[i] != wd[i]) return false;
  return id[0] == s->b && (s->g == 1 || s->g == s->h) && (s->t > 0 || s->b * s->q * s->h * s->k == 0);
}

// The one-line error for inputs that `read_shape` refuses.
std::string inputs_text(ffi::Buffer<ffi::F32>& value, ffi::Buffer<ffi::S32>& index, ffi::Buffer<ffi::F32>& weight) {
  return "value " + ShapeText(value) + ", index " + ShapeText(index) + " and weight " + ShapeText(weight) +
         " do not fit (batch, tokens, groups, channels) and (batch, queries, heads, taps)";
}

ffi::Future Sample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::S32> index,
                   ffi::Buffer<ffi::F32> weight, ffi::ResultBuffer<ffi::F32> out) {
  Shape s;
  if (!read_shape(value, index, weight, &s))
    return Failed("deformable_sampling: " + inputs_text(value, index, weight));
  const auto od = out->dimensions();
  if (od.size() != 4 || od[0] != s.b || od[1] != s.q || od[2] != s.h || od[3] != s.c)
    return Failed("deformable_sampling: the output " + ShapeText(*out) + " does not fit value " + ShapeText(value) +
                  " and index " + ShapeText(index));
  const int64_t rows = s.b * s.q * s.h, tasks = row_task_count(s);
  const int64_t per = tasks > 0 ? (rows + tasks - 1) / tasks : 0;
  const float* v = value.typed_data();
  const int32_t* idx = index.typed_data();
  const float* w = weight.typed_data();
  float* o = out->typed_data();
  return Launch(pool, [=](int64_t task) {
    sample_rows(s, v, idx, w, o, task * per, std::min(rows, (task + 1) * per));
  }, tasks);
}

ffi::Future SampleGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> value, ffi::Buffer<ffi::S32> index,
                       ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::F32> d_out,
                       ffi::ResultBuffer<ffi::F32> d_value, ffi::ResultBuffer<ffi::F32> d_weight) {
  Shape s;
  if (!read_shape(value, index, weight, &s))
    return Failed("deformable_sampling_grad: " + inputs_text(value, index, weight));
  const auto od = d_out.dimensions(), dvd = d_value->dimensions(), dwd = d_weight->dimensions();
  if (od.size() != 4 || od[0] != s.b || od[1] != s.q || od[2] != s.h || od[3] != s.c ||
      dvd.size() != 4 || dvd[0] != s.b || dvd[1] != s.t || dvd[2] != s.g || dvd[3] != s.c ||
      dwd.size() != 4 || dwd[0] != s.b || dwd[1] != s.q || dwd[2] != s.h || dwd[3] != s.k)
    return Failed("deformable_sampling_grad: d_out " + ShapeText(d_out) + ", d_value " + ShapeText(*d_value) +
                  " and d_weight " + ShapeText(*d_weight) + " do not fit value " + ShapeText(value) + " and index " +
                  ShapeText(index));
  const float* v = value.typed_data();
  const int32_t* idx = index.typed_data();
  const float* w = weight.typed_data();
  const float* go = d_out.typed_data();
  float* dv = d_value->typed_data();
  float* dw = d_weight->typed_data();
  const int64_t pairs = s.b * s.g;
  const int64_t rows = s.b * s.q * s.h, row_tasks = row_task_count(s);
  const int64_t per = row_tasks > 0 ? (rows + row_tasks - 1) / row_tasks : 0;
  // d_value by (batch, group) pairs, d_weight by rows, side by side
  return Launch(pool, [=](int64_t task) {
    if (task < pairs) return value_grad_pair(s, idx, w, go, dv, task / s.g, task % s.g);
    task -= pairs;
    weight_grad_rows(s, v, idx, go, dw, task * per, std::min(rows, (task + 1) * per));
  }, pairs + row_tasks);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RtdetrDeformableSamplingF32, Sample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RtdetrDeformableSamplingGradF32, SampleGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
