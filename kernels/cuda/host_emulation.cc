// The stack switch of the CUDA host emulation (host_emulation.h); tests only.
#include "kernels/cuda/host_emulation.h"

#ifdef FEDTUNE_EMU_ASM_SWITCH
// fedtune_emu_switch_stack(void** save_sp /* rdi */, void* load_sp /* rsi */): System V x86-64.
// Pushes the callee-saved general registers, saves rsp, switches to load_sp, pops the other
// context's registers and returns into it. (SSE/x87 control words are not switched: the
// emulated kernels do not change them.)
asm(R"(
  .text
  .globl fedtune_emu_switch_stack
  .type fedtune_emu_switch_stack, @function
fedtune_emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fedtune_emu_switch_stack, .-fedtune_emu_switch_stack
  .section .note.GNU-stack,"",@progbits
)");
#endif
