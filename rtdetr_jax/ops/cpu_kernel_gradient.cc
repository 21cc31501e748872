// The kernel gradient of a 2-d convolution on the CPU, NHWC, float32: an XLA FFI custom call.
//
//   dk[a, b, ci, co] = sum over n, r, c of x[n, r * s + a - p, c * s + b - p, ci] * dy[n, r, c, co]
//
// (zero where the input index falls in the padding). For each tap (a, b) that is a product (ci x pixels) @
// (pixels x co) whose contraction runs over the pixels: very long, while ci and co are 3-512. XLA:CPU computes it
// as a convolution over batch-innermost copies of both operands, and Eigen's matrix products run such skinny
// shapes at 40-150 GFLOP/s on the 2-core development machine; here the pixels are walked in place, row by row,
// with no copy, padding or transpose, and each tap's product is a register-tiled outer-product accumulation
// (`tile` below), ~190-210 GFLOP/s there (benchmarks/README.md).
//
// Exactness and determinism: each output element is a float32 sum over the pixels, taken in a fixed order that depends
// on the shapes only (not on the thread count or the scheduling, nor on the vector width where the CPU has FMA
// instructions): within a block of rows in pixel order, starting from zero; block sums added in order into one of
// `kChunks` chunk sums; the chunk sums added in order at the end. The shorter partial sums also keep the rounding error
// at float32's usual ~sqrt(pixels) growth.
//
// Threads: the call is asynchronous (an FFI future): its work goes to XLA's intra-op thread pool as tasks of
// ~2 ms (`Job`), the calling thread returns to the pool at once, and the task that ends the last part completes
// the future. No thread ever waits for another, so nothing can deadlock whatever else the pool runs. A blocking
// call (the caller working through the chunks, then waiting for the helper tasks it had scheduled) ran most of
// the r18vd training step's calls on the calling thread alone, the helpers starting late or never (counted per
// call), and the step gained less: paired 0.968 of the previous kernel gradients' time against 0.937-0.941
// asynchronously (benchmarks/README.md).
//
// Built once per machine by rtdetr_jax/ops/native.py with the host compiler at -O3 -march=native, so the tile
// below becomes AVX-512, AVX2 or SSE code as the CPU allows.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "cpu_tasks.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using rtdetr_jax::Failed;
using rtdetr_jax::ShapeText;

#if defined(__AVX512F__)
constexpr int kLanes = 16;  // floats per vector register
constexpr int kRows = 12;   // tile: kRows input channels x kCols vectors of output channels, 24 zmm accumulators
#elif defined(__AVX__)
constexpr int kLanes = 8;
constexpr int kRows = 6;    // 12 ymm accumulators (the 6 x 16 tile of BLIS's Haswell kernel)
#else
constexpr int kLanes = 4;
constexpr int kRows = 4;
#endif
constexpr int kCols = 2;
constexpr int kChunks = 8;           // fixed: the summation order must not depend on the machine's thread count
constexpr double kPartFlop = 4e8;     // a task's work: ~2 ms on a core
constexpr int64_t kBlockFloats = 65536;  // dy floats per block of rows (256 KiB), see block_rows
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

struct Geometry {
  int64_t n, h, w, ci;  // x (n, h, w, ci)
  int64_t ho, wo, co;   // dy (n, ho, wo, co), co a multiple of kLanes (the Python side pads it)
  int64_t kh, kw, stride, pad;
};

// One row of the contraction: `len` pixels, x at `x` (step `xstep` floats a pixel), dy at `dy` (step `co`).
struct Row {
  const float* x;
  const float* dy;
};

// acc[i][j] = sum over the rows and their pixels of x[i] * dy[j-th vector]; then c[i][j] += acc[i][j].
// R input channels (rows of the tile), V vectors of output channels.
template <int R, int V>
inline void tile(const Row* rows, int nrows, int64_t len, int64_t xstep, int64_t dystep, float* c, int64_t cstep) {
  Vec acc[R][V];
  for (int i = 0; i < R; i++)
    for (int j = 0; j < V; j++) acc[i][j] = Vec{};
  for (int q = 0; q < nrows; q++) {
    const float* xp = rows[q].x;
    const float* dp = rows[q].dy;
    for (int64_t k = 0; k < len; k++, xp += xstep, dp += dystep) {
      Vec b[V];
      for (int j = 0; j < V; j++) std::memcpy(&b[j], dp + j * kLanes, sizeof(Vec));
      for (int i = 0; i < R; i++) {
        const Vec a = Vec{} + xp[i];  // broadcast
        for (int j = 0; j < V; j++) acc[i][j] += a * b[j];
      }
    }
  }
  for (int i = 0; i < R; i++)
    for (int j = 0; j < V; j++) {
      Vec sum;
      std::memcpy(&sum, c + i * cstep + j * kLanes, sizeof(Vec));
      sum += acc[i][j];
      std::memcpy(c + i * cstep + j * kLanes, &sum, sizeof(Vec));
    }
}

template <int V>
inline void tile_rows(int r, const Row* rows, int nrows, int64_t len, int64_t xstep, int64_t dystep, float* c,
                      int64_t cstep) {
  switch (r) {  // input channels left in this tile: kRows, or the remainder of ci
#if defined(__AVX512F__)
    case 12: return tile<12, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 11: return tile<11, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 10: return tile<10, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 9: return tile<9, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 8: return tile<8, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 7: return tile<7, V>(rows, nrows, len, xstep, dystep, c, cstep);
#endif
#if defined(__AVX__) || defined(__AVX512F__)
    case 6: return tile<6, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 5: return tile<5, V>(rows, nrows, len, xstep, dystep, c, cstep);
#endif
    case 4: return tile<4, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 3: return tile<3, V>(rows, nrows, len, xstep, dystep, c, cstep);
    case 2: return tile<2, V>(rows, nrows, len, xstep, dystep, c, cstep);
    default: return tile<1, V>(rows, nrows, len, xstep, dystep, c, cstep);
  }
}

// Output rows per block: 64-1024 pixels, about 256 KiB of dy (and the x rows they read), so that a block stays
// in the core's L2 cache while every tap and tile passes over it. Blocks of 64 KiB of dy ran r18vd's kernel
// gradients 5-25% slower alone on the development machine, and the strided 256-channel one 1.9x slower.
int64_t block_rows(const Geometry& g) {
  const int64_t pixels = std::max<int64_t>(64, std::min<int64_t>(1024, kBlockFloats / g.co));
  return std::max<int64_t>(1, pixels / std::max<int64_t>(1, g.wo));
}

// Adds to `dk` (kh, kw, ci, co) the kernel gradient over the output rows [begin, end) of the batch's n * ho rows.
void accumulate(const Geometry& g, const float* x, const float* dy, int64_t begin, int64_t end, float* dk) {
  const int64_t rb = block_rows(g);
  const int64_t xstep = g.stride * g.ci;
  std::vector<Row> rows(rb), at(rb);
  for (int64_t b0 = begin; b0 < end; b0 += rb) {
    const int64_t b1 = std::min(end, b0 + rb);
    for (int64_t a = 0; a < g.kh; a++) {
      for (int64_t b = 0; b < g.kw; b++) {
        // output columns whose input column c * stride + b - pad lies inside the image: c >= ceil((pad - b) / s)
        // (a negative bound, rounded either way, means 0) and c <= floor((w - 1 + pad - b) / s), whose numerator
        // is negative when the tap lies past a narrow image for every column: then no column
        const int64_t c0 = std::max<int64_t>(0, (g.pad - b + g.stride - 1) / g.stride);
        const int64_t last = g.w - 1 + g.pad - b;
        const int64_t c1 = last < 0 ? 0 : std::min<int64_t>(g.wo, last / g.stride + 1);
        if (c1 <= c0) continue;
        int nrows = 0;
        for (int64_t q = b0; q < b1; q++) {
          const int64_t n = q / g.ho, r = q % g.ho;
          const int64_t xr = r * g.stride + a - g.pad;
          if (xr < 0 || xr >= g.h) continue;
          rows[nrows].x = x + ((n * g.h + xr) * g.w + c0 * g.stride + b - g.pad) * g.ci;
          rows[nrows].dy = dy + ((n * g.ho + r) * g.wo + c0) * g.co;
          nrows++;
        }
        if (nrows == 0) continue;
        float* dkt = dk + (a * g.kw + b) * g.ci * g.co;
        for (int64_t m0 = 0; m0 < g.ci; m0 += kRows) {
          const int r = static_cast<int>(std::min<int64_t>(kRows, g.ci - m0));
          for (int64_t n0 = 0; n0 < g.co;) {
            const int v = n0 + kCols * kLanes <= g.co ? kCols : 1;
            for (int q = 0; q < nrows; q++) at[q] = Row{rows[q].x + m0, rows[q].dy + n0};
            float* c = dkt + m0 * g.co + n0;
            if (v == kCols) tile_rows<kCols>(r, at.data(), nrows, c1 - c0, xstep, g.co, c, g.co);
            else tile_rows<1>(r, at.data(), nrows, c1 - c0, xstep, g.co, c, g.co);
            n0 += v * kLanes;
          }
        }
      }
    }
  }
}

// One call's work: `chunks` ranges of output rows, each summed into its own slice of `sums`, in parts of `part_rows`
// rows (whole blocks, so the sums do not depend on where the parts end). One task per part is scheduled on XLA's pool
// up front; a task claims a chunk that no other task is working on, runs its next part and returns to the pool, which
// so gets a thread back between parts for the other work XLA runs beside this call (in the r18vd step, parts of 1e8 and
// 2e9 FLOP ran as fast as these). A chunk's parts run one at a time, in order. A task that finds every chunk with parts
// left busy returns at once; the task that releases a chunk keeps going while no scheduled task is left to start. The
// task that ends the last part adds the slices in order into the output and completes the call's future.
struct Job {
  Geometry g;
  const float* x;
  const float* dy;
  float* out;
  int64_t chunks, rows_per_chunk, part_rows, size;  // size: kh * kw * ci * co
  std::vector<float> sums;                          // (chunks, size)
  std::unique_ptr<std::atomic<int>[]> busy;         // per chunk: a task is running one of its parts
  std::vector<int64_t> next_row;                    // per chunk: its next part's first row (owned while busy)
  std::atomic<int64_t> pending{0};                  // tasks scheduled and not yet started
  std::atomic<int64_t> left{0};                     // chunks not finished
  ffi::Promise promise;

  int64_t chunk_end(int64_t c) const { return std::min(g.n * g.ho, (c + 1) * rows_per_chunk); }

  // Claims a chunk with parts left that no task is running; -1 if there is none.
  int64_t claim() {
    for (int64_t c = 0; c < chunks; c++) {
      int expected = 0;
      if (busy[c].load() == 0 && busy[c].compare_exchange_strong(expected, 1)) {
        if (next_row[c] < chunk_end(c)) return c;
        busy[c].store(0);
      }
    }
    return -1;
  }

  void task() {
    pending.fetch_sub(1);
    for (int64_t c; (c = claim()) >= 0;) {
      const int64_t begin = next_row[c], end = chunk_end(c), stop = std::min(end, begin + part_rows);
      float* sum = &sums[c * size];
      if (begin == c * rows_per_chunk) std::fill(sum, sum + size, 0.0f);
      accumulate(g, x, dy, begin, stop, sum);
      next_row[c] = stop;
      busy[c].store(0);
      if (stop == end && left.fetch_sub(1) == 1) return finish();
      if (pending.load() > 0) return;  // a task still to start will claim what is left
    }
  }

  void finish() {
    std::copy(sums.begin(), sums.begin() + size, out);
    for (int64_t c = 1; c < chunks; c++) {
      const float* s = &sums[c * size];
      for (int64_t e = 0; e < size; e++) out[e] += s[e];
    }
    promise.SetAvailable();
  }
};

// Asynchronous (see "Threads" at the top): schedules the parts' tasks and returns the future they complete.
ffi::Future KernelGradient(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dk, int64_t stride, int64_t padding) {
  const auto xd = x.dimensions(), dyd = dy.dimensions(), kd = dk->dimensions();
  // the operands' shapes for an error message, built only when one is returned
  auto shapes = [&] {
    return "x " + ShapeText(x) + ", dy " + ShapeText(dy) + " and the kernel gradient " + ShapeText(*dk);
  };
  if (xd.size() != 4 || dyd.size() != 4 || kd.size() != 4)
    return Failed("kernel_gradient: " + shapes() + " must be 4-d (NHWC, NHWC, HWIO)");
  if (stride < 1 || padding < 0)
    return Failed("kernel_gradient: stride " + std::to_string(stride) + " and padding " + std::to_string(padding) +
                  " must be >= 1 and >= 0");
  Geometry g{xd[0], xd[1], xd[2], xd[3], dyd[1], dyd[2], dyd[3], kd[0], kd[1], stride, padding};
  if (dyd[0] != g.n || kd[2] != g.ci || kd[3] != g.co ||
      g.ho != (g.h + 2 * padding - g.kh) / stride + 1 || g.wo != (g.w + 2 * padding - g.kw) / stride + 1)
    return Failed("kernel_gradient: " + shapes() + " do not fit at stride " + std::to_string(stride) +
                  ", padding " + std::to_string(padding));
  if (g.co % kLanes != 0)
    return Failed("kernel_gradient: " + std::to_string(g.co) + " output channels are not a multiple of " +
                  std::to_string(kLanes) + " (the Python side pads them)");
  const int64_t size = g.kh * g.kw * g.ci * g.co;
  const int64_t total = g.n * g.ho;
  auto job = std::make_shared<Job>();
  ffi::Future future(job->promise);
  job->g = g;
  job->x = x.typed_data();
  job->dy = dy.typed_data();
  job->out = dk->typed_data();
  job->size = size;
  if (total == 0 || size == 0) {
    std::fill(job->out, job->out + size, 0.0f);
    job->promise.SetAvailable();
    return future;
  }
  // the chunk count depends on the shapes only (the summation order with it): one for small problems (under
  // ~8 MFLOP), where scheduling would cost more than it spreads
  const double flop = 2.0 * total * g.wo * size;
  const int64_t chunks = flop < 8e6 ? 1 : std::min<int64_t>(kChunks, total);
  job->rows_per_chunk = (total + chunks - 1) / chunks;
  job->chunks = (total + job->rows_per_chunk - 1) / job->rows_per_chunk;
  job->sums.resize(job->chunks * size);
  job->busy.reset(new std::atomic<int>[job->chunks]);
  for (int64_t c = 0; c < job->chunks; c++) {
    job->busy[c].store(0);
    job->next_row.push_back(c * job->rows_per_chunk);
  }
  job->left.store(job->chunks);
  // parts of ~kPartFlop each, in whole blocks of rows
  const int64_t rb = block_rows(g);
  job->part_rows = rb * std::max<int64_t>(1, static_cast<int64_t>(kPartFlop / (flop / total * rb)));
  const int64_t parts_per_chunk = (job->rows_per_chunk + job->part_rows - 1) / job->part_rows;
  const int64_t tasks = job->chunks == 1 ? 1 : job->chunks * parts_per_chunk;
  job->pending.store(tasks);
  if (tasks == 1) {
    job->task();
    return future;
  }
  for (int64_t t = 0; t < tasks; t++) pool.Schedule([job] { job->task(); });
  return future;
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RtdetrKernelGradientF32, KernelGradient,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));
