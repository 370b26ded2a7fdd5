#pragma once
// The per-CPU choices of the loops (Note [CPU tuning]); a small header, so that code
// outside the CPU loops (python_step.cpp) can ask too.

#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

namespace fused_optim::cpu {

// Note [CPU tuning]
// What the loops do beyond the plain stream is chosen once per process, from a table of
// the microarchitectures it was measured on, with the plain stream (no software prefetch)
// for every other CPU: hardware prefetchers are built for streams, and a distance tuned
// on one CPU was measured to cost 10-30% on another. FUSED_OPTIM_PREFETCH=auto|off|N
// forces the loops' distance (N: in elements; 16-bit types ask for the same bytes ahead as
// float, 2N elements), for experiments. No choice changes a result bit: the tests run
// the bitwise comparisons with each one forced. To measure the choices against each other
// on a CPU, time them in the same rounds of one process (set_cpu_tuning below, bench.py
// --tuning): comparing separate processes misled on the Zen 5, where memory placement
// differed from process to process (docs/benchmarks.md, CPU tuning).
// FUSED_OPTIM_GATHER_PREFETCH=auto|on|off does the same for the eager step's gather, and
// FUSED_OPTIM_Q8_CODES=auto|gather|arithmetic for how the AVX-512 copies find 8-bit codes
// (Note [8-bit codes by arithmetic] in multi_tensor.h), and
// FUSED_OPTIM_FLOAT_LOOPS=auto|avx512|avx2-load-bound|avx2 for the copy that float32 and
// float64 params' loops run on a CPU with AVX-512 (Note [float loops in AVX2] in
// multi_tensor.h).
struct CpuTuning {
  int64_t prefetch_ahead;  // elements ahead of the current chunk; 0: no software prefetch
  bool gather_prefetch;    // python_step.cpp's Note [prefetch] for Python objects
  bool q8_arithmetic;      // 8-bit codes by arithmetic, else by the table's gather
  // float32/float64 loops in the AVX2 copy on a CPU with AVX-512 (Note [float loops in
  // AVX2] in multi_tensor.h): none, the load-bound rules' (Rule::kLoadBound), or all
  enum class FloatLoops { kAvx512, kAvx2LoadBound, kAvx2 } float_loops;
  std::string cpu;         // the CPU as the table knows it
  std::string source;      // "table", "default", or the FUSED_OPTIM_* variable(s) that forced it
};
const CpuTuning& cpu_tuning();

// python_step.cpp's gather prefetch (cpu_tuning().gather_prefetch), read once per object it
// would prefetch: a plain load, where cpu_tuning() is a call.
extern std::atomic<bool> gather_prefetch_on;

// For benchmarks that compare the choices inside one process (bench.py --tuning): each
// setting is "NAME=VALUE", NAME one of FUSED_OPTIM_PREFETCH, FUSED_OPTIM_GATHER_PREFETCH,
// FUSED_OPTIM_Q8_CODES and FUSED_OPTIM_FLOAT_LOOPS (each at most once), VALUE what the
// variable takes ("auto": the table's choice); the tuning becomes the table's with these
// applied, and for the names not given the values the variables had when the process made
// its own choice (its first step); an empty list restores that choice. A bad setting
// raises the variable's own error and changes nothing. Not while a step runs on another
// thread.
void set_cpu_tuning(const std::vector<std::string>& settings);

// Makes the CPU loops' choices (the ISA, FUSED_OPTIM_ISA, and cpu_tuning()) if they are not
// made yet: a bad FUSED_OPTIM_* value raises here.
void make_cpu_choices();

// The value of an environment variable that overrides a choice made per machine, or
// nullopt where it is unset, empty or "auto" (the machine's own choice stands).
std::optional<std::string> env_choice(const char* name);

// A count that an environment variable overrides: nullopt as env_choice, 0 for "off" or
// "0", else an integer from 1 to `max`; anything else raises "<name> must be auto, off or
// <what>, not <value>".
std::optional<int64_t> env_count(const char* name, int64_t max, const char* what);

// One of the values that an environment variable chooses between: nullopt as env_choice,
// else the value, which must be one of `values` (anything else raises "<name> must be auto,
// <a>, <b> or <c>, not <value>").
std::optional<std::string> env_one_of(const char* name, std::initializer_list<const char*> values);

}  // namespace fused_optim::cpu
