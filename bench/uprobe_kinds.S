/* Tiny functions whose instruction at a known offset is the one to probe
 * (bench/uprobe_kinds.py).  Every function is called with edi = 0 and returns. */
        .text
        .macro FN name
        .globl \name
        .type \name, @function
        .p2align 4
\name:
        .endm

FN k_baseline           /* +0 ret: nothing probed in this one */
        ret
FN k_endbr64            /* +0 endbr64 */
        endbr64
        ret
FN k_push_rbp           /* +0 push %rbp */
        push %rbp
        pop %rbp
        ret
FN k_push_r12           /* +0 push %r12 (REX.B) */
        push %r12
        pop %r12
        ret
FN k_nop1               /* +0 nop */
        nop
        ret
FN k_nop4               /* +0 nopl 0x0(%rax) */
        .byte 0x0f, 0x1f, 0x40, 0x00
        ret
FN k_nop5               /* +0 nopl 0x0(%rax,%rax,1): the USDT nop */
        .byte 0x0f, 0x1f, 0x44, 0x00, 0x00
        ret
FN k_mov                /* +0 mov %rdi,%rax */
        mov %rdi, %rax
        ret
FN k_sub_rsp            /* +0 sub $0x18,%rsp: SSL_write's first instruction */
        sub $0x18, %rsp
        add $0x18, %rsp
        ret
FN k_lea_r12            /* +2 lea -0x48(%rsp),%r12: Go's first instruction */
        push %r12
        lea -0x48(%rsp), %r12
        pop %r12
        ret
FN k_jcc_not_taken      /* +2 jne (not taken) */
        test %edi, %edi
        jne 1f
1:      ret
FN k_jcc_taken          /* +2 je (taken) */
        test %edi, %edi
        je 1f
        nop
1:      ret
FN k_jcc_rel32          /* +2 jne rel32 (not taken) */
        test %edi, %edi
        .byte 0x0f, 0x85, 0x00, 0x00, 0x00, 0x00
        ret
FN k_jmp                /* +0 jmp rel8 */
        jmp 1f
1:      ret
FN k_call               /* +0 call rel32 */
        call k_baseline
        ret
FN k_ret                /* +0 ret */
        ret
FN k_xor                /* +0 xor %eax,%eax */
        xor %eax, %eax
        ret
FN k_cmp_mem            /* +0 cmp 0x10(%rsp),%rsp: Go's stack check reads memory */
        cmp 0x10(%rsp), %rsp
        ret
FN k_jmp_indirect       /* +7 jmp *%rax: NSPR's PR_Write ends so */
        lea k_baseline(%rip), %rax
        jmp *%rax
/* A function whose first instruction is single-stepped and which has an emulated
 * jcc at +6: the uprobe may move, the uretprobe's breakpoint may not. */
FN k_sub_then_jcc
        sub $0x18, %rsp
        test %edi, %edi
        jne 1f
1:      add $0x18, %rsp
        ret
        .section .note.GNU-stack,"",@progbits
