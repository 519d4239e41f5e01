"""bench/profile_step.py attributes GPU kernels to the kind of HLO instruction that launched them."""

from bench.profile_step import instruction_kinds

HLO = """
ENTRY %main {
  %custom-call.279 = (f32[65536,32768]{1,0}, s8[33554432]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm", metadata={op_name="jit(train_step)/jvp(...D,DV->...V)/dot_general"}
  %dot_product_attention_fwd.8 = (bf16[16,12,4096,64]{3,2,1,0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"
  %loop_convert_fusion = bf16[16,4096,32768]{2,1,0} fusion(%x), kind=kLoop, calls=%fused_convert, metadata={op_name="jit(train_step)/transpose(jvp())/convert_element_type"}
  %input_reduce_fusion.76 = f32[16,4096]{1,0} fusion(%x), kind=kInput, calls=%fused_reduce
  %gemm_fusion = bf16[64,64]{1,0} fusion(%a, %b), kind=kCustom, calls=%f, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %all-reduce.3 = f32[768]{0} all-reduce(%g), replica_groups={}, to_apply=%add
  ROOT %tuple = (f32[]) tuple(%c)
}
"""


def test_kinds_and_sources_of_a_compiled_step():
    kinds, sources = instruction_kinds(HLO)
    assert kinds["custom-call.279"] == "matmul"
    assert kinds["dot_product_attention_fwd.8"] == "attention (cuDNN)"
    assert kinds["loop_convert_fusion"] == "elementwise fusion"
    assert kinds["input_reduce_fusion.76"] == "reduction fusion"
    assert kinds["gemm_fusion"] == "matmul"
    assert kinds["all-reduce.3"] == "collective"
    assert kinds["tuple"] == "tuple"
    assert sources["loop_convert_fusion"] == "transpose(jvp())/convert_element_type"
    assert "dot_product_attention_fwd.8" not in sources
