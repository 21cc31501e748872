// Training batch norm's per-channel statistics on the CPU, float32: two XLA FFI custom calls over a (rows,
// channels) matrix (the (batch, H, W, channels) map with its leading axes flattened).
//
//   moments        mean[c] = sum_r x[r, c] / rows,  var[c] = sum_r (x[r, c] - mean[c])^2 / rows  (biased)
//   grad moments   sum_dy[c] = sum_r dy[r, c],      sum_dy_centered[c] = sum_r dy[r, c] * (x[r, c] - mean[c])
//
// The backward of batch norm needs the second pair (ops/batch_norm.py: the bias gradient and, times 1/std, the
// weight gradient). Why: XLA:CPU sums over the rows as matrix-vector products (a reduce over the leading axes
// would be a reduce-window tree, slower still), each after a fusion that writes its operand out ((x - mean)^2,
// dy * xhat): ~4 passes over the map forward and ~3 backward besides the ones that compute y and dx. Here each sum
// reads its inputs once, in one call per direction (the forward's centered pass re-reads a chunk from the cache).
//
// Exactness and determinism: the rows are cut into chunks of a fixed size (256 rows, fewer where that would be
// over 64 Ki floats; whatever the thread count); per chunk the sums run in float32 in row order (the forward
// two-pass: the chunk's mean, then its squared deviations from it), and the chunks are combined in chunk order in
// double (Chan et al.'s pairwise update for the variance). So the results are bitwise the same with one thread or
// many, and closer to the exact value than a float32 sum over all rows.
//
// Threads: asynchronous (an FFI future), as cpu_kernel_gradient.cc: the chunks are split into independent tasks
// on XLA's intra-op pool, each writing its chunks' partial sums; the task that ends last combines them and
// completes the future (`Launch`, cpu_tasks.h).
//
// Built once per machine by rtdetr_jax/ops/native.py with the host compiler at -O3 -march=native.

#include <algorithm>
#include <cstdint>
#include <memory>
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
using rtdetr_jax::Split;
using rtdetr_jax::SplitWork;
using rtdetr_jax::store;
using rtdetr_jax::V16;

constexpr int64_t kChunkFloats = 1 << 16;  // floats per chunk at most: 256 KiB, in the L2 cache for a second pass
constexpr int64_t kChunkRows = 256;        // rows per chunk at most: short float32 sums, the rest added in double
constexpr double kTaskFloats = 2e6;        // floats read per task (~1 ms on a core)
constexpr int64_t kMaxTasks = 64;
// How the rows are cut: chunks of `chunk_rows` rows (the last one shorter), grouped into `tasks` runs of
// consecutive chunks. The chunks depend on the shape only; the tasks just divide the work.
struct Plan {
  int64_t rows, channels, chunk_rows, chunks, tasks, chunks_per_task;
};

Plan make_plan(int64_t rows, int64_t channels) {
  Plan p{rows, channels, 0, 0, 0, 0};
  if (rows <= 0 || channels <= 0) return p;
  p.chunk_rows = std::max<int64_t>(1, std::min<int64_t>({rows, kChunkRows, kChunkFloats / channels}));
  p.chunks = (rows + p.chunk_rows - 1) / p.chunk_rows;
  const Split split = SplitWork(p.chunks, static_cast<double>(rows) * channels, kTaskFloats, kMaxTasks);
  p.tasks = split.tasks;
  p.chunks_per_task = split.per_task;
  return p;
}

// Runs f(k, r0, r1) for task `task`'s chunks k, each over rows [r0, r1), in order.
template <typename F>
void for_each_chunk(const Plan& p, int64_t task, F f) {
  for (int64_t k = task * p.chunks_per_task; k < std::min(p.chunks, (task + 1) * p.chunks_per_task); k++)
    f(k, k * p.chunk_rows, std::min(p.rows, (k + 1) * p.chunk_rows));
}

// acc[:n] += x[:n]
inline void add_row(float* acc, const float* x, int64_t n) {
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) store(acc + c, load(acc + c) + load(x + c));
  for (; c < n; c++) acc[c] += x[c];
}

// acc[:n] += (x[:n] - m[:n])^2
inline void add_squared_deviation(float* acc, const float* x, const float* m, int64_t n) {
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) {
    const V16 d = load(x + c) - load(m + c);
    store(acc + c, load(acc + c) + d * d);
  }
  for (; c < n; c++) {
    const float d = x[c] - m[c];
    acc[c] += d * d;
  }
}

// s1[:n] += dy[:n], s2[:n] += dy[:n] * (x[:n] - m[:n])
inline void add_grad_row(float* s1, float* s2, const float* dy, const float* x, const float* m, int64_t n) {
  int64_t c = 0;
  for (; c + kWidth <= n; c += kWidth) {
    const V16 g = load(dy + c);
    store(s1 + c, load(s1 + c) + g);
    store(s2 + c, load(s2 + c) + g * (load(x + c) - load(m + c)));
  }
  for (; c < n; c++) {
    s1[c] += dy[c];
    s2[c] += dy[c] * (x[c] - m[c]);
  }
}

// (rows, channels) of a 2-d buffer; false if it is not 2-d.
template <typename B>
bool matrix_shape(const B& buffer, int64_t* rows, int64_t* channels) {
  const auto d = buffer.dimensions();
  if (d.size() != 2) return false;
  *rows = d[0];
  *channels = d[1];
  return true;
}

template <typename B>
bool is_vector(const B& buffer, int64_t n) {
  const auto d = buffer.dimensions();
  return d.size() == 1 && d[0] == n;
}

ffi::Future Moments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> mean,
                    ffi::ResultBuffer<ffi::F32> var) {
  int64_t rows, channels;
  if (!matrix_shape(x, &rows, &channels))
    return Failed("channel_moments: x must be (rows, channels), got " + ShapeText(x));
  if (rows == 0) return Failed("channel_moments: x " + ShapeText(x) + " has no rows");
  if (!is_vector(*mean, channels) || !is_vector(*var, channels))
    return Failed("channel_moments: the outputs must be (channels,) for x " + ShapeText(x) + ", got " +
                  ShapeText(*mean) + " and " + ShapeText(*var));
  const Plan p = make_plan(rows, channels);
  // per chunk: its mean and its sum of squared deviations from that mean, channels each
  auto partial = std::make_shared<std::vector<float>>(2 * p.chunks * channels);
  const float* xs = x.typed_data();
  float* mean_out = mean->typed_data();
  float* var_out = var->typed_data();
  auto work = [p, partial, xs](int64_t task) {
    const int64_t c = p.channels;
    for_each_chunk(p, task, [&](int64_t k, int64_t r0, int64_t r1) {
      float* m = partial->data() + 2 * k * c;
      float* m2 = m + c;
      std::fill(m, m + 2 * c, 0.0f);
      for (int64_t r = r0; r < r1; r++) add_row(m, xs + r * c, c);
      const float inv = 1.0f / static_cast<float>(r1 - r0);
      for (int64_t j = 0; j < c; j++) m[j] *= inv;
      for (int64_t r = r0; r < r1; r++) add_squared_deviation(m2, xs + r * c, m, c);
    });
  };
  auto finish = [p, partial, mean_out, var_out] {
    const int64_t c = p.channels;
    for (int64_t j = 0; j < c; j++) {
      // Chan et al.: merge the chunks one by one, in order
      double n = 0, mu = 0, m2 = 0;
      for (int64_t k = 0; k < p.chunks; k++) {
        const double nk = static_cast<double>(std::min(p.rows, (k + 1) * p.chunk_rows) - k * p.chunk_rows);
        const double mk = (*partial)[2 * k * c + j], m2k = (*partial)[(2 * k + 1) * c + j];
        const double total = n + nk, delta = mk - mu;
        mu += delta * (nk / total);
        m2 += m2k + delta * delta * (n * nk / total);
        n = total;
      }
      mean_out[j] = static_cast<float>(mu);
      var_out[j] = static_cast<float>(m2 / n);
    }
  };
  return Launch(pool, work, p.tasks, finish);
}

ffi::Future GradMoments(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> mean, ffi::ResultBuffer<ffi::F32> sum_dy,
                        ffi::ResultBuffer<ffi::F32> sum_dy_centered) {
  int64_t rows, channels, xr, xc;
  if (!matrix_shape(dy, &rows, &channels) || !matrix_shape(x, &xr, &xc) || xr != rows || xc != channels)
    return Failed("channel_grad_moments: dy and x must be (rows, channels) alike, got " + ShapeText(dy) + " and " +
                  ShapeText(x));
  if (!is_vector(mean, channels))
    return Failed("channel_grad_moments: mean must be (channels,) for x " + ShapeText(x) + ", got " +
                  ShapeText(mean));
  if (!is_vector(*sum_dy, channels) || !is_vector(*sum_dy_centered, channels))
    return Failed("channel_grad_moments: the outputs must be (channels,) for x " + ShapeText(x) + ", got " +
                  ShapeText(*sum_dy) + " and " + ShapeText(*sum_dy_centered));
  const Plan p = make_plan(rows, channels);
  auto partial = std::make_shared<std::vector<float>>(2 * p.chunks * channels);
  const float* g = dy.typed_data();
  const float* xs = x.typed_data();
  const float* m = mean.typed_data();
  float* s1_out = sum_dy->typed_data();
  float* s2_out = sum_dy_centered->typed_data();
  auto work = [p, partial, g, xs, m](int64_t task) {
    const int64_t c = p.channels;
    for_each_chunk(p, task, [&](int64_t k, int64_t r0, int64_t r1) {
      float* s1 = partial->data() + 2 * k * c;
      float* s2 = s1 + c;
      std::fill(s1, s1 + 2 * c, 0.0f);
      for (int64_t r = r0; r < r1; r++) add_grad_row(s1, s2, g + r * c, xs + r * c, m, c);
    });
  };
  auto finish = [p, partial, s1_out, s2_out] {
    const int64_t c = p.channels;
    for (int64_t j = 0; j < c; j++) {
      double s1 = 0, s2 = 0;
      for (int64_t k = 0; k < p.chunks; k++) {
        s1 += (*partial)[2 * k * c + j];
        s2 += (*partial)[(2 * k + 1) * c + j];
      }
      s1_out[j] = static_cast<float>(s1);
      s2_out[j] = static_cast<float>(s2);
    }
  };
  return Launch(pool, work, p.tasks, finish);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RtdetrChannelMomentsF32, Moments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RtdetrChannelGradMomentsF32, GradMoments,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
