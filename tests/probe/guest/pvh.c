/*
 * pvh.c - what a PVH loader handed over (xen/include/public/arch-x86/hvm/
 * start_info.h): hvm_start_info's magic and version, the command line,
 * the RSDP pointer, the memory map (version 1) and the first module (the
 * initrd). Fills the same struct boot_info as bootparams.c, so the E820,
 * initrd, memory and ACPI checks run unchanged.
 */
#include "probe.h"

struct hvm_start_info {
	u32 magic;
	u32 version;
	u32 flags;
	u32 nr_modules;
	u64 modlist_paddr;
	u64 cmdline_paddr;
	u64 rsdp_paddr;
	u64 memmap_paddr;	/* version >= 1 */
	u32 memmap_entries;
	u32 reserved;
};

struct hvm_modlist_entry {
	u64 paddr;
	u64 size;
	u64 cmdline_paddr;
	u64 reserved;
};

struct hvm_memmap_table_entry {
	u64 addr;
	u64 size;
	u32 type;
	u32 reserved;
};

#define CMDLINE_MAX 2048

static struct e820_entry pvh_map[E820_MAX];

static const struct hvm_start_info *start_info(u64 pa)
{
	if (pa == 0 || pa >= IDENT_LIMIT || (pa & 7))
		return NULL;
	const struct hvm_start_info *si = (const void *)pa;
	return si->magic == HVM_START_MAGIC ? si : NULL;
}

/* The command line, or NULL when there is none or it is out of reach. */
const char *pvh_cmdline(u64 pa)
{
	const struct hvm_start_info *si = start_info(pa);
	if (!si || !si->cmdline_paddr || si->cmdline_paddr + CMDLINE_MAX >= IDENT_LIMIT)
		return NULL;
	return (const char *)si->cmdline_paddr;
}

void pvh_check(u64 pa, u64 load_addr)
{
	extern char _pm_start[], _end[];
	boot.pvh = 1;
	boot.load_addr = load_addr;
	boot.init_size = (u64)(_end - _pm_start);
	pr("probe: pvh entry ebx=0x%lx load=0x%lx\n", pa, load_addr);
	const struct hvm_start_info *si = start_info(pa);
	if (!si) {
		fail("ebx=0x%lx is not an hvm_start_info (magic 0x%x)", pa, HVM_START_MAGIC);
		return;
	}
	pr("probe: hvm_start_info version=%u flags=0x%x nr_modules=%u cmdline=0x%lx rsdp=0x%lx memmap=0x%lx/%u\n",
	   si->version, si->flags, si->nr_modules, si->cmdline_paddr, si->rsdp_paddr,
	   si->version >= 1 ? si->memmap_paddr : 0, si->version >= 1 ? si->memmap_entries : 0);
	boot.source = "hvm_start_info";
	boot.info_page = pa;

	const char *cl = pvh_cmdline(pa);
	boot.cmdline = cl ? si->cmdline_paddr : 0;
	if (cl) {
		usize n = 0;
		while (n < CMDLINE_MAX && cl[n])
			n++;
		if (n == CMDLINE_MAX)
			fail("command line not NUL-terminated within %u bytes", CMDLINE_MAX);
		cmdline_set(cl);
		pr("probe: cmdline \"%s\"\n", cl);
	} else {
		cmdline_set("");
		pr("probe: cmdline none\n");
	}

	boot.rsdp = si->rsdp_paddr;

	if (si->version >= 1 && si->memmap_entries) {
		u32 n = si->memmap_entries;
		if (n > E820_MAX || si->memmap_paddr >= IDENT_LIMIT) {
			fail("hvm_start_info memmap at 0x%lx with %u entries", si->memmap_paddr, n);
		} else {
			const struct hvm_memmap_table_entry *m = (const void *)si->memmap_paddr;
			for (u32 i = 0; i < n; i++) {
				pvh_map[i].addr = m[i].addr;
				pvh_map[i].size = m[i].size;
				pvh_map[i].type = m[i].type;
			}
			boot.e820 = pvh_map;
			boot.e820_count = n;
		}
	} else {
		pr("probe: note hvm_start_info version %u has no memory map\n", si->version);
	}

	if (si->nr_modules && si->modlist_paddr && si->modlist_paddr < IDENT_LIMIT) {
		const struct hvm_modlist_entry *mod = (const void *)si->modlist_paddr;
		boot.initrd = mod->paddr;
		boot.initrd_size = mod->size;
	}
}
