/*
 * bootparams.c - checks of what the loader handed over in the zero page
 * (struct boot_params): setup header copy, command line, E820 map against
 * probe.mem, the initrd bytes against probe.initrd_sum, and that every
 * E820 RAM range is really backed by memory.
 */
#include "probe.h"

/* struct boot_params offsets (arch/x86/include/uapi/asm/bootparam.h) */
#define BP_ACPI_RSDP_ADDR	0x070
#define BP_EXT_RAMDISK_IMAGE	0x0c0
#define BP_EXT_RAMDISK_SIZE	0x0c4
#define BP_EXT_CMD_LINE_PTR	0x0c8
#define BP_E820_ENTRIES		0x1e8
#define BP_HDR			0x1f1
#define BP_E820_TABLE		0x2d0
/* setup_header fields, as zero-page offsets */
#define HDR_SETUP_SECTS		0x1f1
#define HDR_BOOT_FLAG		0x1fe
#define HDR_HEADER		0x202
#define HDR_VERSION		0x206
#define HDR_TYPE_OF_LOADER	0x210
#define HDR_LOADFLAGS		0x211
#define HDR_CODE32_START	0x214
#define HDR_RAMDISK_IMAGE	0x218
#define HDR_RAMDISK_SIZE	0x21c
#define HDR_CMD_LINE_PTR	0x228
#define HDR_INITRD_ADDR_MAX	0x22c
#define HDR_XLOADFLAGS		0x236
#define HDR_CMDLINE_SIZE	0x238
#define HDR_INIT_SIZE		0x260

#define E820_RAM 1

struct boot_info boot;

static u8 zp8(u32 off) { return *(volatile u8 *)(boot.zero_page + off); }
static u16 zp16(u32 off) { return *(volatile u16 *)(boot.zero_page + off); }
static u32 zp32(u32 off) { return *(volatile u32 *)(boot.zero_page + off); }
static u64 zp64(u32 off) { return *(volatile u64 *)(boot.zero_page + off); }

static const char *e820_name(u32 type)
{
	switch (type) {
	case 1: return "ram";
	case 2: return "reserved";
	case 3: return "acpi";
	case 4: return "nvs";
	case 5: return "unusable";
	case 7: return "pmem";
	default: return "other";
	}
}

void bootparams_check(u64 zero_page, u64 load_addr)
{
	boot.zero_page = zero_page;
	boot.load_addr = load_addr;
	pr("probe: entry64 rsi=0x%lx load=0x%lx\n", zero_page, load_addr);
	if (zero_page == 0 || zero_page >= IDENT_LIMIT || (zero_page & 0xfff)) {
		fail("boot_params pointer rsi=0x%lx is not a page in low memory", zero_page);
		boot.zero_page = 0;
		return;
	}

	u32 magic = zp32(HDR_HEADER);
	u16 version = zp16(HDR_VERSION);
	u8 loader = zp8(HDR_TYPE_OF_LOADER);
	pr("probe: setup_header magic=%s version=0x%x boot_flag=0x%x type_of_loader=0x%x loadflags=0x%x xloadflags=0x%x\n",
	   magic == 0x53726448 ? "HdrS" : "missing", version, zp16(HDR_BOOT_FLAG), loader,
	   zp8(HDR_LOADFLAGS), zp16(HDR_XLOADFLAGS));
	if (magic != 0x53726448)
		fail("boot_params.hdr has no HdrS magic: the setup header was not copied");
	else if (version < 0x20c)
		fail("boot_params.hdr.version 0x%x < 0x20c", version);
	if (loader == 0)
		fail("boot_params.hdr.type_of_loader is 0: Linux then ignores the initrd");
	boot.source = "boot_params";
	boot.info_page = boot.zero_page;
	boot.init_size = zp32(HDR_INIT_SIZE);
	u32 code32 = zp32(HDR_CODE32_START);
	if (code32 != (u32)load_addr)
		pr("probe: note code32_start=0x%x differs from the load address\n", code32);

	/* Command line. */
	u64 cl = (u64)zp32(HDR_CMD_LINE_PTR) | ((u64)zp32(BP_EXT_CMD_LINE_PTR) << 32);
	u32 clsize = zp32(HDR_CMDLINE_SIZE);
	boot.cmdline = cl;
	if (cl == 0 || cl >= IDENT_LIMIT) {
		fail("cmd_line_ptr=0x%lx", cl);
		cmdline_set("");
	} else {
		const char *s = (const char *)cl;
		usize n = 0;
		while (n <= clsize && s[n])
			n++;
		if (n > clsize)
			fail("command line not NUL-terminated within cmdline_size %u", clsize);
		cmdline_set(s);
		pr("probe: cmdline \"%s\"\n", s);
	}

	boot.rsdp = zp64(BP_ACPI_RSDP_ADDR);
	boot.initrd = (u64)zp32(HDR_RAMDISK_IMAGE) | ((u64)zp32(BP_EXT_RAMDISK_IMAGE) << 32);
	boot.initrd_size = (u64)zp32(HDR_RAMDISK_SIZE) | ((u64)zp32(BP_EXT_RAMDISK_SIZE) << 32);
	boot.initrd_addr_max = zp32(HDR_INITRD_ADDR_MAX);
	boot.e820 = (const struct e820_entry *)(boot.zero_page + BP_E820_TABLE);
	boot.e820_count = zp8(BP_E820_ENTRIES);
}

int e820_is_ram(u64 addr, u64 len)
{
	for (u32 i = 0; i < boot.e820_count; i++) {
		const struct e820_entry *e = &boot.e820[i];
		if (e->type == E820_RAM && addr >= e->addr && addr + len <= e->addr + e->size)
			return 1;
	}
	return 0;
}

void e820_check(void)
{
	if (!boot.source)
		return;
	u32 n = boot.e820_count;
	if (n == 0 || n > E820_MAX) {
		fail("e820_entries=%u", n);
		boot.e820_count = 0;
		return;
	}
	u64 ram = 0, top = 0, prev_end = 0;
	for (u32 i = 0; i < n; i++) {
		const struct e820_entry *e = &boot.e820[i];
		u64 end = e->addr + e->size;
		pr("probe: e820 0x%016lx-0x%016lx %s\n", e->addr, end, e820_name(e->type));
		if (e->size == 0 || end < e->addr)
			fail("e820 entry %u is empty or wraps", i);
		if (e->addr < prev_end)
			fail("e820 entry %u overlaps or is out of order", i);
		prev_end = end;
		if (e->type != E820_RAM)
			continue;
		ram += e->size;
		if (end > top)
			top = end;
		if (e->addr < 0x100000000UL && end > 0xc0000000UL)
			fail("e820 RAM 0x%lx-0x%lx overlaps the MMIO hole 0xc0000000-0x100000000", e->addr, end);
	}
	boot.ram_total = ram;
	boot.ram_top = top;

	if (!e820_is_ram(boot.load_addr, boot.init_size ? boot.init_size : 0x1000))
		fail("the kernel at 0x%lx (init_size 0x%lx) is not in E820 RAM", boot.load_addr, boot.init_size);
	if (!e820_is_ram(0x0, 0x1000) && !e820_is_ram(0x1000, 0x1000))
		pr("probe: note no RAM below 8 KiB\n");

	u64 mem_mib;
	if (!cmdline_u64("probe.mem", &mem_mib)) {
		pr("probe: e820 ram=%lu KiB top=0x%lx (no probe.mem to check)\n", ram >> 10, top);
		return;
	}
	u64 expect = mem_mib * MIB;
	u64 expect_top = expect <= 0xc0000000UL ? expect : expect + 0x40000000UL;
	int ok = ram <= expect && ram + 2 * MIB >= expect && top == expect_top;
	pr("probe: e820 ram=%lu KiB expected=%lu KiB top=0x%lx expected_top=0x%lx %s\n", ram >> 10,
	   expect >> 10, top, expect_top, ok ? "ok" : "MISMATCH");
	if (!ok)
		fail("e820 RAM does not match probe.mem=%lu", mem_mib);
	if (expect > 0xc0000000UL && !e820_is_ram(0x100000000UL, 0x1000))
		fail("memory > 3 GiB but no RAM at 4 GiB");
}

void initrd_check(void)
{
	u64 want_sum, want_size;
	int have_sum = cmdline_u64("probe.initrd_sum", &want_sum);
	int have_size = cmdline_u64("probe.initrd_size", &want_size);
	u64 a = boot.initrd, n = boot.initrd_size;

	if (!boot.source)
		return;
	if (n == 0) {
		if (have_sum || have_size)
			fail("initrd expected but ramdisk_size is 0");
		else
			pr("probe: initrd none\n");
		return;
	}
	pr("probe: initrd addr=0x%lx size=%lu\n", a, n);
	int ok = 1;
	u64 max = boot.initrd_addr_max;
	if (a & 0xfff) {
		fail("initrd at 0x%lx is not page aligned", a);
		ok = 0;
	}
	if (max && a + n - 1 > max) {
		fail("initrd end 0x%lx above initrd_addr_max 0x%lx", a + n, max);
		ok = 0;
	}
	if (!e820_is_ram(a, n)) {
		fail("initrd 0x%lx+0x%lx is not inside E820 RAM", a, n);
		return;
	}
	if (a < boot.load_addr + boot.init_size && boot.load_addr < a + n) {
		fail("initrd overlaps the kernel's init_size area");
		ok = 0;
	}
	if (a < boot.info_page + 0x1000 && boot.info_page < a + n) {
		fail("initrd overlaps the %s", boot.source);
		ok = 0;
	}
	if (have_size && want_size != n) {
		fail("initrd size %lu, expected %lu", n, want_size);
		ok = 0;
	}
	if (have_sum) {
		u64 sum = fnv1a64_words((const void *)a, n);
		pr("probe: initrd sum=0x%016lx expected=0x%016lx\n", sum, want_sum);
		if (sum != want_sum) {
			fail("initrd checksum mismatch");
			ok = 0;
		}
	}
	if (ok)
		pr("probe: initrd ok\n");
}

/* Writes, reads back and restores a word at the ends of each RAM range. */
static int touch(u64 a)
{
	if (a >= IDENT_LIMIT)
		return 1;
	if (a < boot.load_addr + boot.init_size && a + 8 > boot.load_addr)
		return 1;
	volatile u64 *p = (volatile u64 *)a;
	u64 old = *p;
	u64 pat = 0x5a5aa5a5c3c33c3cUL ^ a;
	*p = pat;
	u64 got = *p;
	*p = old;
	if (got != pat) {
		fail("RAM at 0x%lx does not hold data (wrote 0x%lx read 0x%lx)", a, pat, got);
		return 0;
	}
	return 1;
}

void memtouch_check(void)
{
	u32 touched = 0;
	int ok = 1;
	for (u32 i = 0; i < boot.e820_count; i++) {
		const struct e820_entry *e = &boot.e820[i];
		if (e->type != E820_RAM || e->size < 16)
			continue;
		u64 first = e->addr < 0x100000 ? e->addr + 0x1000 : e->addr;
		if (first + 8 <= e->addr + e->size && first >= 0x100000)
			ok &= touch(first);
		ok &= touch((e->addr + e->size - 8) & ~7UL);
		touched++;
	}
	if (ok)
		pr("probe: memtouch ok (%u ranges)\n", touched);
}
