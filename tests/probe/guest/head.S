/*
 * head.S - the bzImage setup header and the 64-bit entry of the probe guest.
 *
 * Owns: the real-mode sector with the Linux boot-protocol setup header
 * (Documentation/arch/x86/boot.rst), the 64-bit entry at protected-mode
 * start + 0x200, the PVH entry (32-bit, paging off, ebx = hvm_start_info,
 * announced by a Xen PHYS32_ENTRY ELF note), the probe's own page tables
 * and GDT, the switch to the link address, and the interrupt/exception
 * entry stubs.
 */

#define PTE_P	0x001
#define PTE_RW	0x002
#define PTE_PWT	0x008
#define PTE_PCD	0x010
#define PTE_PS	0x080

#define IDENT_GIB	8		/* identity map 0..8 GiB with 2 MiB pages */
#define KERNEL_PTS	2		/* 2 page tables: 4 MiB of image + bss */
#define PREBUILT_LOAD	0x100000	/* code32_start */

/*
 * Physical address of a protected-mode symbol in the ELF as linked (its
 * LMA, probe.ld: PROBE_VIRT_BASE -> PROBE_LOAD_PHYS). Only PVH code uses
 * it: a PVH loader puts the ELF's segments at their LMAs.
 */
#define PA(x)	((x) - 0xffffffff80200000 + PREBUILT_LOAD)

#define BOOT_LINUX64	0		/* rsi = boot_params */
#define BOOT_PVH	1		/* rsi = hvm_start_info */

/* ------------------------------------------------------------------ */
/* Boot sector + setup sectors (loaded by nobody: 64-bit boot only).   */
/* ------------------------------------------------------------------ */
	.section .setup, "a"
	.code16
	.globl	bootsect
bootsect:
	cli
1:	hlt
	jmp	1b
kernel_version_str:
	.asciz	"b2p-probe 0.1 (64-bit boot protocol only)"

	.org	0x1f1
hdr:
setup_sects:	.byte	PROBE_SETUP_SECTS
root_flags:	.word	0
syssize:	.long	PROBE_SYSSIZE
ram_size:	.word	0
vid_mode:	.word	0xffff			/* NORMAL_VGA */
root_dev:	.word	0
boot_flag:	.word	0xaa55

	.org	0x200
_start:		.byte	0xeb			/* jmp short start_of_setup */
		.byte	start_of_setup - 1f
1:
header:		.ascii	"HdrS"
version:	.word	0x020c			/* 2.12: xloadflags */
realmode_swtch:	.long	0
start_sys_seg:	.word	0x1000
kernel_version:	.word	kernel_version_str - 0x200
type_of_loader:	.byte	0
loadflags:	.byte	0x01			/* LOADED_HIGH */
setup_move_size: .word	0x8000
code32_start:	.long	0x100000
ramdisk_image:	.long	0
ramdisk_size:	.long	0
bootsect_kludge: .long	0
heap_end_ptr:	.word	0
ext_loader_ver:	.byte	0
ext_loader_type: .byte	0
cmd_line_ptr:	.long	0
initrd_addr_max: .long	0x7fffffff
kernel_alignment: .long	0x200000
relocatable_kernel: .byte 1
min_alignment:	.byte	12			/* 4 KiB is all the probe needs */
xloadflags:	.word	0x0003			/* XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G */
cmdline_size:	.long	2047
hardware_subarch: .long	0
hardware_subarch_data: .quad 0
payload_offset:	.long	0
payload_length:	.long	0
setup_data:	.quad	0
pref_address:	.quad	0x100000
init_size:	.long	PROBE_INIT_SIZE
handover_offset: .long	0

start_of_setup:
	cli				/* real-mode entry is not supported */
1:	hlt
	jmp	1b

/* ------------------------------------------------------------------ */
/* Protected-mode part: loaded at code32_start (or anywhere aligned).  */
/* ------------------------------------------------------------------ */
	.section .head.text, "ax"
	.code32
	.globl	startup_32
startup_32:
	cli				/* the bzImage 32-bit entry is not supported */
1:	hlt
	jmp	1b

	/*
	 * PVH entry (xen/include/public/arch-x86/hvm/start_info.h): 32-bit
	 * protected mode, paging off, flat CS/DS, ebx = hvm_start_info, no
	 * usable stack. Long mode on the probe's identity map, then the
	 * 64-bit entry's common path. Runs at the LMA, so PA() addresses.
	 */
	.globl	pvh_start32
pvh_start32:
	outb	%al, $0x80			/* first guest instruction, as below */
	cli
	cld
	movl	%ebx, %esi			/* hvm_start_info (physical) */
	/* PML4[0] -> pdpt_ident -> pd_ident (prebuilt), as startup_64 does. */
	movl	$(PA(pdpt_ident) + PTE_P + PTE_RW), PA(pml4)
	movl	$PA(pdpt_ident), %edi
	movl	$(PA(pd_ident) + PTE_P + PTE_RW), %eax
	xorl	%ecx, %ecx
1:	movl	%eax, (%edi, %ecx, 8)
	addl	$4096, %eax
	incl	%ecx
	cmpl	$IDENT_GIB, %ecx
	jb	1b
	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	$PA(pml4), %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	orl	$0x100, %eax
	wrmsr
	lgdt	PA(pvh_gdt_desc)
	movl	%cr0, %eax
	orl	$0x80000001, %eax		/* PG | PE */
	movl	%eax, %cr0
	ljmp	$0x08, $PA(pvh_start64)

	.code64
pvh_start64:
	movl	$BOOT_PVH, %r13d
	jmp	startup_common

	.org	0x200
	.code64
	.globl	startup_64
startup_64:
	/*
	 * The very first instruction is a port write: the monitor's first
	 * vCPU exit marks "first guest instruction".
	 */
	outb	%al, $0x80
	xorl	%r13d, %r13d			/* BOOT_LINUX64 */
startup_common:
	cli
	cld
	movq	%rsi, %r15			/* boot_params or hvm_start_info (physical) */
	leaq	startup_32(%rip), %r14		/* where the loader put us */

	/*
	 * Zero C's .bss (the page tables and the stack need no zeroing; this
	 * code is emulated instruction by instruction here: keep it short).
	 */
	leaq	_bss_zero_start(%rip), %rdi
	leaq	_bss_end(%rip), %rcx
	subq	%rdi, %rcx
	shrq	$3, %rcx
	xorl	%eax, %eax
	rep stosq

	leaq	pdpt_ident(%rip), %rdi
	leaq	pd_ident(%rip), %rax
	orq	$(PTE_P | PTE_RW), %rax
	xorl	%ecx, %ecx
1:	movq	%rax, (%rdi, %rcx, 8)
	addq	$4096, %rax
	incl	%ecx
	cmpl	$IDENT_GIB, %ecx
	jb	1b

	/* Kernel mapping: PROBE_VIRT_BASE -> load address, 4 KiB pages, as
	 * many as init_size needs. Prebuilt for the usual load address. */
	cmpq	$PREBUILT_LOAD, %r14
	je	2f
	leaq	pt_kernel(%rip), %rdi
	movq	%r14, %rax
	orq	$(PTE_P | PTE_RW), %rax
	xorl	%ecx, %ecx
	movl	$PROBE_KERNEL_PAGES, %edx
1:	movq	%rax, (%rdi, %rcx, 8)
	addq	$4096, %rax
	incl	%ecx
	cmpl	%edx, %ecx
	jb	1b
2:
	leaq	pd_kernel(%rip), %rdi
	leaq	pt_kernel(%rip), %rax
	orq	$(PTE_P | PTE_RW), %rax
	movq	%rax, 8(%rdi)			/* PD index 1: 0x...80200000 */
	addq	$4096, %rax
	movq	%rax, 16(%rdi)			/* PD index 2: 0x...80400000 */

	leaq	pdpt_kernel(%rip), %rdi
	leaq	pd_kernel(%rip), %rax
	orq	$(PTE_P | PTE_RW), %rax
	movq	%rax, (510 * 8)(%rdi)

	leaq	pml4(%rip), %rdi
	leaq	pdpt_ident(%rip), %rax
	orq	$(PTE_P | PTE_RW), %rax
	movq	%rax, (%rdi)
	leaq	pdpt_kernel(%rip), %rax
	orq	$(PTE_P | PTE_RW), %rax
	movq	%rax, (511 * 8)(%rdi)

	movq	%rdi, %cr3
	movabsq	$startup_64_high, %rax
	jmp	*%rax

startup_64_high:
	/* Our own GDT: 0x08 and 0x10 are both 64-bit code (the boot protocol
	 * says CS=0x10, Firecracker-style monitors use 0x08), 0x18 is data. */
	lgdt	gdt_desc(%rip)
	movl	$0x18, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	leaq	stack_top(%rip), %rsp
	xorl	%ebp, %ebp
	movq	%r15, %rdi			/* boot_params / hvm_start_info */
	movq	%r14, %rsi			/* load address */
	movq	%r13, %rdx			/* BOOT_LINUX64 / BOOT_PVH */
	call	probe_main
1:	cli
	hlt
	jmp	1b

/* ------------------------------------------------------------------ */
/* Interrupt and exception entry.                                      */
/* ------------------------------------------------------------------ */
	.text
	.macro	ISR n
	.align	16
isr_\n:
	.if (\n == 8 || \n == 10 || \n == 11 || \n == 12 || \n == 13 || \n == 14 || \n == 17 || \n == 21 || \n == 29 || \n == 30)
	pushq	$\n
	.else
	pushq	$0
	pushq	$\n
	.endif
	jmp	isr_common
	.endm

	.altmacro
	.macro	ISR_RANGE from, to
	ISR	%(\from)
	.if \to-\from
	ISR_RANGE %(\from+1), \to
	.endif
	.endm

	ISR_RANGE 0, 63
	ISR_RANGE 64, 127
	ISR_RANGE 128, 191
	ISR_RANGE 192, 255

isr_common:
	pushq	%rax
	pushq	%rbx
	pushq	%rcx
	pushq	%rdx
	pushq	%rsi
	pushq	%rdi
	pushq	%rbp
	pushq	%r8
	pushq	%r9
	pushq	%r10
	pushq	%r11
	pushq	%r12
	pushq	%r13
	pushq	%r14
	pushq	%r15
	movq	%rsp, %rdi
	call	trap_dispatch
	popq	%r15
	popq	%r14
	popq	%r13
	popq	%r12
	popq	%r11
	popq	%r10
	popq	%r9
	popq	%r8
	popq	%rbp
	popq	%rdi
	popq	%rsi
	popq	%rdx
	popq	%rcx
	popq	%rbx
	popq	%rax
	addq	$16, %rsp			/* vector + error code */
	iretq

	.section .rodata
	.align	8
	.macro	ISR_ADDR n
	.quad	isr_\n
	.endm
	.macro	ISR_ADDR_RANGE from, to
	ISR_ADDR %(\from)
	.if \to-\from
	ISR_ADDR_RANGE %(\from+1), \to
	.endif
	.endm
	.globl	isr_table
isr_table:
	ISR_ADDR_RANGE 0, 63
	ISR_ADDR_RANGE 64, 127
	ISR_ADDR_RANGE 128, 191
	ISR_ADDR_RANGE 192, 255
	.noaltmacro

	.data
	.align	16
gdt:
	.quad	0
	.quad	0x00af9b000000ffff		/* 0x08: 64-bit code */
	.quad	0x00af9b000000ffff		/* 0x10: 64-bit code (__BOOT_CS) */
	.quad	0x00cf93000000ffff		/* 0x18: data (__BOOT_DS) */
gdt_end:
	.align	8
	.word	0, 0, 0
gdt_desc:
	.word	gdt_end - gdt - 1
	.quad	gdt
	/* The same GDT for lgdt in 32-bit mode, before paging: physical base. */
	.align	8
	.word	0, 0, 0
pvh_gdt_desc:
	.word	gdt_end - gdt - 1
	.long	PA(gdt)

	/*
	 * XEN_ELFNOTE_PHYS32_ENTRY: the PVH entry's physical address. PVH
	 * loaders (b2p-vmm, QEMU, Cloud Hypervisor) find it in the ELF's
	 * PT_NOTE; probe.ld keeps it out of the bzImage's way at its end.
	 */
	.section .note.Xen, "a", @note
	.balign	4
	.long	4				/* namesz: "Xen\0" */
	.long	4				/* descsz */
	.long	18				/* XEN_ELFNOTE_PHYS32_ENTRY */
	.asciz	"Xen"
	.balign	4
	.long	PA(pvh_start32)
	.balign	4

	/*
	 * The identity map's page directories do not depend on where we were
	 * loaded: built by the assembler, 2 MiB pages, the 3..4 GiB MMIO hole
	 * uncached. (Every guest instruction is emulated on this workplace's
	 * KVM, so a loop writing 4096 entries would cost ~40 ms.)
	 */
	.section .data.pagetables, "aw"
	.align	4096
pd_ident:
	.set	i, 0
	.rept	IDENT_GIB * 512
	.if	(i >= 1536) && (i < 2048)
	.quad	(i << 21) | PTE_P | PTE_RW | PTE_PS | PTE_PCD | PTE_PWT
	.else
	.quad	(i << 21) | PTE_P | PTE_RW | PTE_PS
	.endif
	.set	i, i + 1
	.endr
	/* Mostly-empty upper levels: zeros from the image, a few entries set at entry. */
pml4:		.skip	4096
pdpt_ident:	.skip	4096
pdpt_kernel:	.skip	4096
pd_kernel:	.skip	4096

	/* The kernel mapping's page tables, prebuilt for a load at
	 * code32_start; rewritten at entry when the loader chose elsewhere. */
	.align	4096
pt_kernel:
	.set	i, 0
	.rept	KERNEL_PTS * 512
	.quad	(PREBUILT_LOAD + (i << 12)) | PTE_P | PTE_RW
	.set	i, i + 1
	.endr

	.section .bss.pagetables, "aw", @nobits
	.align	4096
stack:		.skip	16384
stack_top:
	/* Zeroed at entry: C's .bss follows. */
	.section .bss.zeroed, "aw", @nobits
	.align	4096
	.globl	_bss_zero_start
_bss_zero_start:

/* ------------------------------------------------------------------ */
/* AP trampoline: copied to AP_TRAMP (a SIPI vector page) by smp.c.    */
/* Real mode -> protected mode -> long mode on the BSP's page tables,  */
/* then a jump to ap_entry on the stack the BSP left in ap_stack.      */
/* ------------------------------------------------------------------ */
#define AP_TRAMP 0x10000
#define T(x) (AP_TRAMP + (x) - ap_tramp)

	.section .rodata.trampoline, "a"
	.globl	ap_tramp, ap_tramp_end, ap_tramp_cr3, ap_tramp_stack, ap_tramp_entry
	.code16
ap_tramp:
	cli
	cld
	movw	%cs, %ax
	movw	%ax, %ds
	lgdtl	(ap_gdt_desc - ap_tramp)
	movl	%cr0, %eax
	orl	$1, %eax
	movl	%eax, %cr0
	ljmpl	$0x08, $T(ap32)

	.code32
ap32:
	movl	$0x10, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	movl	%cr4, %eax
	orl	$0x20, %eax			/* PAE */
	movl	%eax, %cr4
	movl	T(ap_tramp_cr3), %eax
	movl	%eax, %cr3
	movl	$0xc0000080, %ecx		/* EFER.LME */
	rdmsr
	orl	$0x100, %eax
	wrmsr
	movl	%cr0, %eax
	orl	$0x80000001, %eax		/* PG | PE */
	movl	%eax, %cr0
	ljmpl	$0x18, $T(ap64)

	.code64
ap64:
	movq	T(ap_tramp_stack), %rsp
	movq	T(ap_tramp_entry), %rax
	jmp	*%rax

	.align	8
ap_gdt:
	.quad	0
	.quad	0x00cf9a000000ffff		/* 0x08: 32-bit code */
	.quad	0x00cf92000000ffff		/* 0x10: data */
	.quad	0x00af9a000000ffff		/* 0x18: 64-bit code */
ap_gdt_desc:
	.word	ap_gdt_desc - ap_gdt - 1
	.long	T(ap_gdt)
	.align	8
ap_tramp_cr3:	.quad	0
ap_tramp_stack:	.quad	0
ap_tramp_entry:	.quad	0
ap_tramp_end:

	/* Where APs land from the trampoline: our GDT (CS 0x08 is 64-bit
	 * code there too), data segments, then C. */
	.text
	.code64
	.globl	ap_start64
ap_start64:
	lgdt	gdt_desc(%rip)
	movl	$0x18, %eax
	movl	%eax, %ds
	movl	%eax, %es
	movl	%eax, %ss
	xorl	%eax, %eax
	movl	%eax, %fs
	movl	%eax, %gs
	call	ap_main
1:	cli
	hlt
	jmp	1b
