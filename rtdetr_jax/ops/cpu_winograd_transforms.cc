// Winograd F(2x2, 3x3)'s two data transforms on the CPU, float32: two XLA FFI custom calls (ops/winograd.py has
// the algorithm; its XLA forms are the reference these are tested against).
//
//   input transform   x (batch, H, W, c) -> 16 planes V[a][b] (batch, th, tw, c), th = ceil(H / 2),
//                     tw = ceil(W / 2): per tile (t, s), B^T d B of the 4x4 input patch d at rows 2t-1..2t+2 and
//                     columns 2s-1..2s+2 (zero outside the map: the convolution's padding of 1)
//   output transform  16 planes M[a][b] (batch, th, tw, c) -> y (batch, H, W, c): per tile, A^T m A, the 2x2
//                     block at rows 2t..2t+1 and columns 2s..2s+1, cropped to (H, W)
//
// with B^T = [[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]] and A^T = [[1,1,1,0],[0,1,-1,-1]]. Planes are numbered
// a * 4 + b.
//
// Why: XLA:CPU builds the 16 planes as a padded copy of the map and fusions that re-read it, at 2-3.5x the time
// of writing the planes once, and the output's 2x2 blocks through a stacked copy. Here each tile's patch is read
// once, transformed in registers (16 channels at a time) and written once. Measured on the 2-core development
// machine (median of 15): the input transform at (4, 160, 160, 64) 9.6 -> 4.6 ms, (4, 80, 80, 128) 4.2 -> 2.4 ms,
// (4, 20, 20, 512) 0.94 -> 0.52 ms; the output transform 4.7 -> 4.3, 2.0 -> 2.1, 0.41 -> 0.36 ms; the r18vd
// batch-4 train step 2.3-2.7% faster (benchmarks/README.md).
//
// Exactness: the transforms are additions and subtractions only, in the same order as ops/winograd.py's (XLA does
// not reassociate float additions), so the results equal XLA's bit for bit, whatever the thread count
// (tests/test_native_winograd_transforms.py).
//
// Threads: asynchronous (an FFI future): the tile rows are split into independent tasks on XLA's intra-op pool
// (`Launch`, cpu_tasks.h), each writing its own rows of the outputs; the task that ends last completes the future.
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

constexpr double kTaskFloats = 1e6;  // plane floats (written or read) per task: ~0.5 ms on a core
constexpr int64_t kMaxTasks = 64;
constexpr int kPlanes = 16;

// B^T d along one axis, as ops/winograd.py's _input_transform
template <typename T>
inline void input_axis(const T& d0, const T& d1, const T& d2, const T& d3, T* out) {
  out[0] = d0 - d2;
  out[1] = d1 + d2;
  out[2] = d2 - d1;
  out[3] = d1 - d3;
}

// A^T m along one axis, as ops/winograd.py's _output_transform
template <typename T>
inline void output_axis(const T& m0, const T& m1, const T& m2, const T& m3, T* out) {
  out[0] = m0 + m1 + m2;
  out[1] = m1 - m2 - m3;
}

// One tile's 16 planes from its patch: d[i][j] the patch's row i, column j (one vector or scalar of channels).
// Rows first (ops/winograd.py: rows = B^T d over the row axis, then each row's columns), v[a * 4 + b].
template <typename T>
inline void input_tile(const T d[4][4], T v[kPlanes]) {
  T rows[4][4];  // rows[a][j]
  for (int j = 0; j < 4; j++) {
    T r[4];
    input_axis(d[0][j], d[1][j], d[2][j], d[3][j], r);
    for (int a = 0; a < 4; a++) rows[a][j] = r[a];
  }
  for (int a = 0; a < 4; a++) input_axis(rows[a][0], rows[a][1], rows[a][2], rows[a][3], v + a * 4);
}

// One tile's 2x2 outputs y[p][q] from its 16 products m[a * 4 + b]: columns first, as _assemble_output
// (cols[b][p] = A^T over a, then A^T over b).
template <typename T>
inline void output_tile(const T m[kPlanes], T y[2][2]) {
  T cols[4][2];  // cols[b][p]
  for (int b = 0; b < 4; b++) output_axis(m[0 * 4 + b], m[1 * 4 + b], m[2 * 4 + b], m[3 * 4 + b], cols[b]);
  for (int p = 0; p < 2; p++) {
    T q[2];
    output_axis(cols[0][p], cols[1][p], cols[2][p], cols[3][p], q);
    y[p][0] = q[0];
    y[p][1] = q[1];
  }
}

struct Dims {
  int64_t batch, h, w, c, th, tw;
};

// Tasks over the batch * th tile rows (`tasks` runs of `per_task` consecutive tile rows); none for an empty map.
Split tile_row_tasks(const Dims& d) {
  if (d.tw == 0 || d.c == 0) return Split{0, 0};
  const int64_t tile_rows = d.batch * d.th;
  return SplitWork(tile_rows, static_cast<double>(tile_rows) * d.tw * d.c * kPlanes, kTaskFloats, kMaxTasks);
}

// The input transform of tile rows [r0, r1): `zeros` is a row of c zeros, read where the patch lies outside the map.
void input_rows(const Dims& d, const float* x, float* const* planes, const float* zeros, int64_t r0, int64_t r1) {
  const int64_t c = d.c;
  for (int64_t r = r0; r < r1; r++) {
    const int64_t n = r / d.th, t = r % d.th;
    const float* row[4];
    for (int i = 0; i < 4; i++) {
      const int64_t y = 2 * t - 1 + i;
      row[i] = (y >= 0 && y < d.h) ? x + ((n * d.h + y) * d.w) * c : nullptr;
    }
    for (int64_t s = 0; s < d.tw; s++) {
      const float* p[4][4];
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
          const int64_t col = 2 * s - 1 + j;
          p[i][j] = (row[i] && col >= 0 && col < d.w) ? row[i] + col * c : zeros;
        }
      const int64_t out = (r * d.tw + s) * c;
      int64_t k = 0;
      for (; k + kWidth <= c; k += kWidth) {
        V16 patch[4][4], v[kPlanes];
        for (int i = 0; i < 4; i++)
          for (int j = 0; j < 4; j++) patch[i][j] = load(p[i][j] + k);
        input_tile(patch, v);
        for (int a = 0; a < kPlanes; a++) store(planes[a] + out + k, v[a]);
      }
      for (; k < c; k++) {
        float patch[4][4], v[kPlanes];
        for (int i = 0; i < 4; i++)
          for (int j = 0; j < 4; j++) patch[i][j] = p[i][j][k];
        input_tile(patch, v);
        for (int a = 0; a < kPlanes; a++) planes[a][out + k] = v[a];
      }
    }
  }
}

// The output transform of tile rows [r0, r1).
void output_rows(const Dims& d, const float* const* m, float* y, int64_t r0, int64_t r1) {
  const int64_t c = d.c;
  for (int64_t r = r0; r < r1; r++) {
    const int64_t n = r / d.th, t = r % d.th;
    float* row[2];
    for (int i = 0; i < 2; i++) {
      const int64_t yy = 2 * t + i;
      row[i] = yy < d.h ? y + ((n * d.h + yy) * d.w) * c : nullptr;
    }
    for (int64_t s = 0; s < d.tw; s++) {
      float* q[2][2];
      for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) q[i][j] = (row[i] && 2 * s + j < d.w) ? row[i] + (2 * s + j) * c : nullptr;
      const int64_t in = (r * d.tw + s) * c;
      int64_t k = 0;
      for (; k + kWidth <= c; k += kWidth) {
        V16 v[kPlanes], out[2][2];
        for (int a = 0; a < kPlanes; a++) v[a] = load(m[a] + in + k);
        output_tile(v, out);
        for (int i = 0; i < 2; i++)
          for (int j = 0; j < 2; j++)
            if (q[i][j]) store(q[i][j] + k, out[i][j]);
      }
      for (; k < c; k++) {
        float v[kPlanes], out[2][2];
        for (int a = 0; a < kPlanes; a++) v[a] = m[a][in + k];
        output_tile(v, out);
        for (int i = 0; i < 2; i++)
          for (int j = 0; j < 2; j++)
            if (q[i][j]) q[i][j][k] = out[i][j];
      }
    }
  }
}

// (batch, H, W, c) of a 4-d buffer; false if it is not 4-d.
template <typename B>
bool map_shape(const B& buffer, Dims* d) {
  const auto s = buffer.dimensions();
  if (s.size() != 4) return false;
  d->batch = s[0];
  d->h = s[1];
  d->w = s[2];
  d->c = s[3];
  d->th = (d->h + 1) / 2;
  d->tw = (d->w + 1) / 2;
  return true;
}

template <typename B>
bool is_plane(const B& buffer, const Dims& d) {
  const auto s = buffer.dimensions();
  return s.size() == 4 && s[0] == d.batch && s[1] == d.th && s[2] == d.tw && s[3] == d.c;
}

std::string PlaneText(const Dims& d) {
  return "(" + std::to_string(d.batch) + ", " + std::to_string(d.th) + ", " + std::to_string(d.tw) + ", " +
         std::to_string(d.c) + ")";
}

ffi::Future InputTransform(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::RemainingRets rets) {
  Dims d;
  if (!map_shape(x, &d)) return Failed("winograd_input_transform: x must be (batch, H, W, c), got " + ShapeText(x));
  if (rets.size() != kPlanes)
    return Failed("winograd_input_transform: expected 16 planes, got " + std::to_string(rets.size()));
  std::vector<float*> planes(kPlanes);
  for (int a = 0; a < kPlanes; a++) {
    auto plane = rets.get<ffi::Buffer<ffi::F32>>(a);
    if (!plane.has_value() || !is_plane(**plane, d))
      return Failed("winograd_input_transform: plane " + std::to_string(a) + " must be " + PlaneText(d) +
                    " float32 for x " + ShapeText(x) +
                    (plane.has_value() ? ", got " + ShapeText(**plane) : std::string()));
    planes[a] = (*plane)->typed_data();
  }
  const Split split = tile_row_tasks(d);
  auto zeros = std::make_shared<std::vector<float>>(d.c, 0.0f);
  const float* xs = x.typed_data();
  auto work = [d, split, xs, planes, zeros](int64_t task) {
    const int64_t r0 = task * split.per_task;
    input_rows(d, xs, planes.data(), zeros->data(), r0, std::min(d.batch * d.th, r0 + split.per_task));
  };
  return Launch(pool, work, split.tasks);
}

ffi::Future OutputTransform(ffi::ThreadPool pool, ffi::RemainingArgs args, ffi::Result<ffi::Buffer<ffi::F32>> y) {
  Dims d;
  if (!map_shape(*y, &d))
    return Failed("winograd_output_transform: y must be (batch, H, W, c), got " + ShapeText(*y));
  if (args.size() != kPlanes)
    return Failed("winograd_output_transform: expected 16 planes, got " + std::to_string(args.size()));
  std::vector<const float*> m(kPlanes);
  for (int a = 0; a < kPlanes; a++) {
    auto plane = args.get<ffi::Buffer<ffi::F32>>(a);
    if (!plane.has_value() || !is_plane(*plane, d))
      return Failed("winograd_output_transform: plane " + std::to_string(a) + " must be " + PlaneText(d) +
                    " float32 for y " + ShapeText(*y) +
                    (plane.has_value() ? ", got " + ShapeText(*plane) : std::string()));
    m[a] = plane->typed_data();
  }
  const Split split = tile_row_tasks(d);
  float* ys = y->typed_data();
  auto work = [d, split, m, ys](int64_t task) {
    const int64_t r0 = task * split.per_task;
    output_rows(d, m.data(), ys, r0, std::min(d.batch * d.th, r0 + split.per_task));
  };
  return Launch(pool, work, split.tasks);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RtdetrWinogradInputTransformF32, InputTransform,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>().RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(RtdetrWinogradOutputTransformF32, OutputTransform,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().RemainingArgs().Ret<ffi::Buffer<ffi::F32>>());
