// fused_optim::_side_by_side: tensors like the given CPU tensors (their copies, or zeros)
// laid out one after the other in a single allocation, each with a storage of its own
// (Note [small states side by side] in fused_optim/optimizer.py says why and when the
// optimizers ask for it).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <vector>

namespace fused_optim::cpu {
namespace {

// Note [copies side by side]
// One allocation from torch's CPU allocator (its profiler and memory hooks see it) holds
// the copies, each starting on a cache line (64 bytes, the allocator's own alignment: the
// vector loops see the alignment they would see) after a pointer to the Region. Each
// copy's storage is as a torch CPU tensor's: its own bytes (torch.save writes those
// only), resizable (a resize moves it to memory of its own from the allocator), and a
// DataPtr whose context is its data pointer, which copy-on-write (torch._lazy_clone)
// requires; so the deleter, given the data pointer, finds the Region just before it, and
// the last copy to go frees the allocation. Between two copies lie at most 72 bytes, a
// gap the hardware prefetchers step over.
struct Region {
  std::atomic<int64_t> copies;
  c10::DataPtr bytes;
};
constexpr int64_t kAlign = 64;
constexpr int64_t kHeader = static_cast<int64_t>(sizeof(Region*));

void release_copy_of(Region* region) {
  if (region->copies.fetch_sub(1, std::memory_order_acq_rel) == 1) delete region;
}

void release_copy(void* data) {
  Region* region;
  std::memcpy(&region, static_cast<char*>(data) - kHeader, sizeof(region));
  release_copy_of(region);
}

std::vector<at::Tensor> side_by_side(const std::vector<at::Tensor>& tensors, bool copy) {
  const char* op = "fused_optim::_side_by_side";
  std::vector<int64_t> offsets;
  offsets.reserve(tensors.size());
  int64_t end = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.layout() == at::kStrided && t.is_contiguous(), op,
                ": tensors[", i, "] is not a contiguous strided CPU tensor");
    const int64_t at = (end + kHeader + kAlign - 1) / kAlign * kAlign;
    offsets.push_back(at);
    end = at + static_cast<int64_t>(t.nbytes());
  }
  std::vector<at::Tensor> out;
  if (tensors.empty()) return out;
  // (counted as each copy's DataPtr is made, one more held here: an error part way
  // leaves no region behind)
  auto* region = new Region{{1}, c10::GetCPUAllocator()->allocate(end)};
  char* base = static_cast<char*>(region->bytes.get());
  struct Hold {
    Region* region;
    ~Hold() { release_copy_of(region); }
  } hold{region};
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    char* data = base + offsets[i];
    std::memcpy(data - kHeader, &region, sizeof(region));
    region->copies.fetch_add(1, std::memory_order_relaxed);
    c10::DataPtr bytes(data, data, &release_copy, c10::Device(c10::kCPU));
    c10::Storage storage(c10::Storage::use_byte_size_t(), t.nbytes(), std::move(bytes),
                         c10::GetCPUAllocator(), /*resizable=*/true);
    out.push_back(at::empty({0}, t.options()).set_(storage, 0, t.sizes(), t.strides()));
  }
  at::parallel_for(0, static_cast<int64_t>(tensors.size()), 64, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const at::Tensor& t = tensors[static_cast<size_t>(i)];
      char* data = base + offsets[static_cast<size_t>(i)];
      if (t.nbytes() == 0) continue;
      if (copy) {
        std::memcpy(data, t.const_data_ptr(), t.nbytes());  // (a copy-on-write source stays one)
      } else {
        std::memset(data, 0, t.nbytes());  // (zero bits: 0 in every dtype)
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("_side_by_side", &side_by_side); }

}  // namespace fused_optim::cpu
