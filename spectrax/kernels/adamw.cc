// Clipped AdamW over every trained float32 parameter in one pass (XLA FFI handler, CPU).
//
// Why a kernel: XLA:CPU (jaxlib 0.10) emits the update of each parameter as three loop
// fusions (new first moment, new second moment, new parameter) that read the gradient three
// times and the moments twice. This pass reads p, g, m, v once and writes p, m, v once, the
// memory-traffic minimum. The arithmetic is spectrax.optim's fused AdamW (optax's order),
// operation for operation, in float32, each operation rounded once (built with
// -ffp-contract=off). XLA:CPU contracts multiply-adds into FMAs, so the two paths differ by
// rounding only (about an ulp a step; tests/test_optim_kernel.py bounds it over 5 steps).
//
// Call: arguments (step, p_0..p_{n-1}, g_0.., m_0.., v_0..), results (p_0.., m_0.., v_0..),
// each result aliased to its argument (updated in place). `step` is float32[5]:
// [apply (1 or 0), gradient scale (clipping), -learning rate, 1 - b1^t, 1 - b2^t].
// Attributes: b1, b2, 1 - b1, 1 - b2, eps, weight_decay (float32, rounded as jax rounds them).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Leaf {
  float* p;
  const float* g;
  float* m;
  float* v;
  int64_t n;
};

struct Constants {
  float scale, neg_lr, correction1, correction2;
  float b1, b2, one_minus_b1, one_minus_b2, eps, weight_decay;
};

// One contiguous range of one leaf; written so that GCC vectorises it (no aliasing between
// the four arrays: they are distinct XLA buffers).
void UpdateRange(const Constants& c, float* __restrict p, const float* __restrict g,
                 float* __restrict m, float* __restrict v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float gi = g[i] * c.scale;
    const float m_new = c.one_minus_b1 * gi + c.b1 * m[i];
    const float v_new = c.one_minus_b2 * (gi * gi) + c.b2 * v[i];
    m[i] = m_new;
    v[i] = v_new;
    float u = (m_new / c.correction1) / (std::sqrt(v_new / c.correction2) + c.eps);
    if (c.weight_decay != 0.0f) u = u + c.weight_decay * p[i];
    p[i] = p[i] + c.neg_lr * u;
  }
}

struct Item {
  int32_t leaf;
  int64_t start, stop;
};

// Work shared by the calling thread and the tasks it schedules. Held by shared_ptr: a task
// that starts after all items are taken only reads `next` and leaves.
struct Work {
  Constants c;
  std::vector<Leaf> leaves;
  std::vector<Item> items;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (;;) {
      const int64_t k = next.fetch_add(1, std::memory_order_relaxed);
      if (k >= static_cast<int64_t>(items.size())) return;
      const Item& it = items[k];
      const Leaf& l = leaves[it.leaf];
      UpdateRange(c, l.p + it.start, l.g + it.start, l.m + it.start, l.v + it.start,
                  it.stop - it.start);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

constexpr int64_t kItemElements = 1 << 16;  // 256 KiB of each array per item

ffi::Error AdamWImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> step, ffi::RemainingArgs args,
                     ffi::RemainingRets rets, float b1, float b2, float one_minus_b1,
                     float one_minus_b2, float eps, float weight_decay) {
  if (step.element_count() != 5) {
    return ffi::Error::InvalidArgument("adamw: the step argument must hold 5 float32 values");
  }
  const float* s = step.typed_data();
  if (args.size() % 4 != 0 || rets.size() * 4 != args.size() * 3) {
    return ffi::Error::InvalidArgument("adamw: expected 4n arguments after step and 3n results");
  }
  const size_t n = args.size() / 4;
  auto work = std::make_shared<Work>();
  work->c = Constants{s[1], s[2], s[3], s[4], b1, b2, one_minus_b1, one_minus_b2, eps,
                      weight_decay};
  const bool apply = s[0] != 0.0f;
  for (size_t i = 0; i < n; ++i) {
    float* ptr[3];
    const float* in[4];
    int64_t count = -1;
    for (size_t k = 0; k < 4; ++k) {
      auto a = args.get<ffi::AnyBuffer>(k * n + i);
      if (!a.has_value()) return a.error();
      if (a->element_type() != ffi::DataType::F32) {
        return ffi::Error::InvalidArgument("adamw: every array must be float32");
      }
      if (count < 0) count = static_cast<int64_t>(a->element_count());
      if (static_cast<int64_t>(a->element_count()) != count) {
        return ffi::Error::InvalidArgument("adamw: p, g, m, v of a leaf differ in size");
      }
      in[k] = static_cast<const float*>(a->untyped_data());
    }
    for (size_t k = 0; k < 3; ++k) {
      auto r = rets.get<ffi::AnyBuffer>(k * n + i);
      if (!r.has_value()) return r.error();
      ptr[k] = static_cast<float*>((*r)->untyped_data());
      const float* source = in[k == 0 ? 0 : k + 1];  // results p, m, v <- arguments p, m, v
      // Aliased results share their argument's memory; copy if XLA ever gave a fresh buffer.
      if (ptr[k] != source) std::memcpy(ptr[k], source, sizeof(float) * count);
    }
    work->leaves.push_back(Leaf{ptr[0], in[1], ptr[1], ptr[2], count});
  }
  if (!apply) return ffi::Error::Success();  // a skipped step: everything stays as it was
  for (size_t i = 0; i < work->leaves.size(); ++i) {
    for (int64_t a = 0; a < work->leaves[i].n; a += kItemElements) {
      work->items.push_back(
          Item{static_cast<int32_t>(i), a, std::min(a + kItemElements, work->leaves[i].n)});
    }
  }
  const int64_t total = static_cast<int64_t>(work->items.size());
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    pool.Schedule([work] { work->Run(); });
  }
  work->Run();
  // Items still being finished by helpers: they are running, so this wait ends.
  while (work->done.load(std::memory_order_acquire) < total) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(spectrax_adamw_f32, AdamWImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("weight_decay"));
