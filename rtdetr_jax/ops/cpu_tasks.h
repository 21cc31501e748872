// Shared by rtdetr_jax's C++ CPU kernels: `Failed` and `ShapeText` for their one-line errors (all of them),
// `SplitWork` (cpu_channel_moments.cc, cpu_winograd_transforms.cc), and
// `Launch` (cpu_channel_moments.cc, cpu_deformable_sampling.cc, cpu_winograd_transforms.cc; the kernel gradient
// schedules its own parts), an asynchronous XLA FFI call as independent tasks on XLA's intra-op pool. `Launch`
// schedules tasks [0, tasks), each running `work(task)` on its own part of the outputs, and returns a future; the
// task that ends last runs `finish()` (if given) and completes the future, so no thread waits for another. A single
// task runs on the calling thread; with no tasks, `finish` runs and the future completes before `Launch` returns.
//
// rtdetr_jax/ops/native.py compiles each source with this folder on the include path and hashes this header
// into the cache key of every kernel, so a change here rebuilds them all.

#ifndef RTDETR_JAX_OPS_CPU_TASKS_H_
#define RTDETR_JAX_OPS_CPU_TASKS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace rtdetr_jax {

namespace ffi = xla::ffi;

struct TaskJob {
  std::function<void(int64_t)> work;
  std::function<void()> finish;
  std::atomic<int64_t> left{0};
  ffi::Promise promise;

  void done() {
    if (finish) finish();
    promise.SetAvailable();
  }

  void run(int64_t task) {
    work(task);
    if (left.fetch_sub(1) == 1) done();
  }
};

// "(d0, d1, ...)": a buffer's shape, for the error messages ("(n,)" for one dimension).
template <typename B>
std::string ShapeText(const B& buffer) {
  std::string text = "(";
  const auto d = buffer.dimensions();
  for (size_t i = 0; i < d.size(); i++) text += (i ? ", " : "") + std::to_string(d[i]);
  return text + (d.size() == 1 ? ",)" : ")");
}

// How `units` pieces of work (`work` in all, in any unit) are cut into tasks of ~`task_work` each: `tasks` runs of
// `per_task` consecutive units (the last one shorter), at least one and at most `max_tasks` (none without units).
struct Split {
  int64_t tasks, per_task;
};

inline Split SplitWork(int64_t units, double work, double task_work, int64_t max_tasks) {
  if (units <= 0) return Split{0, 0};
  const int64_t wanted = std::max<int64_t>(1, static_cast<int64_t>(work / task_work));
  const int64_t tasks = std::min<int64_t>({max_tasks, units, wanted});
  const int64_t per_task = (units + tasks - 1) / tasks;
  return Split{(units + per_task - 1) / per_task, per_task};
}

// A future that fails at once with `message` (an invalid argument: shapes that do not fit).
inline ffi::Future Failed(const std::string& message) {
  ffi::Promise promise;
  ffi::Future future(promise);
  promise.SetError(ffi::Error::InvalidArgument(message));
  return future;
}

inline ffi::Future Launch(ffi::ThreadPool& pool, std::function<void(int64_t)> work, int64_t tasks,
                          std::function<void()> finish = {}) {
  auto job = std::make_shared<TaskJob>();
  ffi::Future future(job->promise);
  job->work = std::move(work);
  job->finish = std::move(finish);
  if (tasks <= 0) {
    job->done();
    return future;
  }
  job->left.store(tasks);
  if (tasks == 1) {
    job->run(0);
    return future;
  }
  for (int64_t t = 0; t < tasks; t++) pool.Schedule([job, t] { job->run(t); });
  return future;
}

}  // namespace rtdetr_jax

#endif  // RTDETR_JAX_OPS_CPU_TASKS_H_
