# Benchmarks only (`NO_FA4=1 bash bench/device_runs.sh ...` puts this folder on PYTHONPATH): vLLM as it runs
# without FlashAttention 4. The device kit lacks the CUTLASS DSL wheels FA4 needs at run time, while vLLM's
# check says FA4 is there; Gemma 4's two head sizes then take vLLM's own fallback, its Triton attention.
import sys

TARGET = "vllm.v1.attention.backends.fa_utils"


class _NoFA4:
    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real = module.is_fa_version_supported
            module.is_fa_version_supported = lambda v: False if v == 4 else real(v)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoFA4())
