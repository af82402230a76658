/*
 * probe.h - shared declarations of the probe guest (freestanding C).
 *
 * The probe runs with the low 8 GiB identity mapped, so a physical address
 * below IDENT_LIMIT is also a valid pointer.
 */
#ifndef PROBE_H
#define PROBE_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long s64;
typedef unsigned long usize;

#define NULL ((void *)0)
#define IDENT_LIMIT (8UL << 30)
#define MIB (1UL << 20)

/* A physical address as a pointer-sized value gcc cannot reason about
 * (it warns on constant addresses near 0). */
static inline u64 phys(u64 a) { __asm__("" : "+r"(a)); return a; }

/* ---- io.h-ish inline helpers ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline void cpu_relax(void) { __asm__ volatile("" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
/* No mfence: SSE2 is not available to this guest (DESIGN.md §8). */
static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" ::: "memory", "cc"); }
static inline void cli(void) { __asm__ volatile("cli" ::: "memory"); }
static inline void sti(void) { __asm__ volatile("sti" ::: "memory"); }
static inline void sti_hlt(void) { __asm__ volatile("sti; hlt" ::: "memory"); }
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return ((u64)hi << 32) | lo; }
static inline void cpuid(u32 leaf, u32 sub, u32 *a, u32 *b, u32 *c, u32 *d)
{
	__asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}
static inline u64 read_cr3(void) { u64 v; __asm__ volatile("mov %%cr3, %0" : "=r"(v)); return v; }

/* ---- lib.c ---- */
void *memset(void *d, int c, usize n);
void *memcpy(void *d, const void *s, usize n);
int memcmp(const void *a, const void *b, usize n);
usize strlen(const char *s);
int strncmp(const char *a, const char *b, usize n);
u8 sum8(const void *p, usize n);
u64 fnv1a64_words(const void *p, usize n);

/* ---- console.c: 8250 serial at 0x3f8 ---- */
void console_init(void);
extern int console_quiet;
void pr(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* ---- console.c: check bookkeeping ---- */
void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
extern int failures;

/* ---- cmdline.c ---- */
void cmdline_set(const char *s);
/* Value of "key=" as a number (decimal or 0x hex); returns 1 when present. */
int cmdline_u64(const char *key, u64 *out);
int cmdline_flag(const char *key);
const char *cmdline_str(const char *key);

/* ---- bootparams.c: zero page, E820, initrd ---- */
struct e820_entry {
	u64 addr;
	u64 size;
	u32 type;
} __attribute__((packed));

struct boot_info {
	const char *source;	/* "boot_params", "hvm_start_info" or NULL */
	int pvh;
	u64 info_page;		/* zero page or hvm_start_info */
	u64 zero_page;
	u64 load_addr;
	u64 init_size;
	u64 cmdline;
	u64 rsdp;
	u32 e820_count;
	const struct e820_entry *e820;
	u64 initrd;
	u64 initrd_size;
	u64 initrd_addr_max;	/* 0: no limit given (PVH) */
	u64 ram_total;
	u64 ram_top;
};
extern struct boot_info boot;
void bootparams_check(u64 zero_page, u64 load_addr);
#define E820_MAX 128

/* ---- pvh.c: hvm_start_info (PVH entry) ---- */
#define HVM_START_MAGIC 0x336ec578
const char *pvh_cmdline(u64 start_info);
void pvh_check(u64 start_info, u64 load_addr);
void e820_check(void);
void initrd_check(void);
void memtouch_check(void);
int e820_is_ram(u64 addr, u64 len);

/* ---- acpi.c ---- */
struct gas {
	u8 space;	/* 0 = memory, 1 = I/O port */
	u8 bit_width;
	u8 bit_offset;
	u8 access_size;
	u64 address;
} __attribute__((packed));

struct acpi_info {
	u64 rsdp, xsdt, fadt, madt, dsdt;
	u32 dsdt_len;
	struct gas sleep_control, sleep_status;
	int have_sleep_regs;
	int s5_typ;		/* -1 if no _S5_ */
	u64 lapic_base;
	u64 ioapic_base;
	u32 ioapic_gsi_base;
	u32 lapic_count;
	u8 apic_ids[255];
	u32 apic_id_count;
};
extern struct acpi_info acpi;
void acpi_check(void);

/* ---- cpu.c: CPUID / LAPIC checks ---- */
void cpu_check(void);

/* ---- trap.c: IDT, exceptions, LAPIC timer ---- */
struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};
void trap_init(void);
void pic_mask(void);
void lapic_eoi(void);
void hold_ms(u64 ms);
void lapic_enable(void);
int wait_change(volatile u32 *flag, u32 seen, u64 ms);
typedef void (*irq_handler)(void);
void irq_set_handler(u8 vector, irq_handler h);

/* ---- smp.c ---- */
void smp_check(const u8 *apic_ids, u32 n);

/* ---- power.c ---- */
void boot_timer_write(void);
void __attribute__((noreturn)) poweroff(void);

/* ---- flood.c ---- */
void __attribute__((noreturn)) flood_run(u64 ms);

#endif
