/*
 * blk.c - virtio-blk driver test, per disk mode from probe.blkN=MODE:
 *   write   write the pattern (probe.blk_seed) at probe.blk_sector, FLUSH,
 *           read it back and compare
 *   verify  read and compare only (a second boot on the same file)
 *   ro      the disk must offer VIRTIO_BLK_F_RO and fail a write with IOERR
 * Completions are interrupt-driven (IOAPIC GSI from the DSDT node).
 */
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX (1UL << 1)
#define VIRTIO_BLK_F_SEG_MAX (1UL << 2)
#define VIRTIO_BLK_F_RO (1UL << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1UL << 6)
#define VIRTIO_BLK_F_FLUSH (1UL << 9)

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8

#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2

#define IO_BYTES 4096

struct blk_req {
	u32 type;
	u32 reserved;
	u64 sector;
} __attribute__((packed));

static struct blk_req *req;
static u8 *status;

/* One request: header, optional data, status. Returns the status byte or -1. */
static int blk_do(struct vdev *d, u32 type, u64 sector, void *data, u32 len, int dev_writes)
{
	struct vbuf b[3];
	int n = 0;
	req->type = type;
	req->reserved = 0;
	req->sector = sector;
	*status = 0xff;
	b[n++] = (struct vbuf){ req, sizeof(*req), 0 };
	if (len)
		b[n++] = (struct vbuf){ data, len, dev_writes };
	b[n++] = (struct vbuf){ status, 1, 1 };
	if (vq_add(&d->q[0], b, n) < 0)
		return -1;
	vq_kick(d, &d->q[0]);
	u32 used = 0;
	if (vq_wait(d, &d->q[0], &used, 10000) < 0) {
		fail("blk%u: request type %u got no completion within 10 s", d->index, type);
		return -1;
	}
	return *status;
}

void fill_pattern(u8 *buf, usize n, u64 seed)
{
	u64 x = seed | 1;
	for (usize i = 0; i < n; i += 8) {
		x ^= x >> 12;
		x ^= x << 25;
		x ^= x >> 27;
		u64 v = x * 0x2545f4914f6cdd1dUL;
		for (usize k = 0; k < 8 && i + k < n; k++)
			buf[i + k] = (u8)(v >> (8 * k));
	}
}

void virtio_blk_test(struct vdev *d, const char *mode)
{
	if (vdev_init(d, VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH |
			      VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_SIZE_MAX) ||
	    vq_setup(d, 0))
		return;
	vdev_enable_irq(d);
	if (vdev_driver_ok(d))
		return;
	if (!req) {
		req = dma_alloc(sizeof(*req), 16);
		status = dma_alloc(1, 1);
	}
	u64 cap = vcfg_read64(d, 0);
	u32 seg_max = (d->features & VIRTIO_BLK_F_SEG_MAX) ? vcfg_read32(d, 12) : 0;
	u32 blk_size = (d->features & VIRTIO_BLK_F_BLK_SIZE) ? vcfg_read32(d, 20) : 512;
	int ro = (d->features & VIRTIO_BLK_F_RO) != 0;
	pr("probe: blk%u capacity=%lu sectors blk_size=%u seg_max=%u ro=%d flush=%d mode=%s\n", d->index,
	   cap, blk_size, seg_max, ro, (d->features & VIRTIO_BLK_F_FLUSH) != 0, mode);

	char *id = dma_alloc(21, 1);
	int st = blk_do(d, T_GET_ID, 0, id, 20, 1);
	if (st == S_OK)
		pr("probe: blk%u serial \"%s\"\n", d->index, id);
	else
		pr("probe: blk%u GET_ID status %d\n", d->index, st);

	u64 seed = 1, sector = 0;
	cmdline_u64("probe.blk_seed", &seed);
	cmdline_u64("probe.blk_sector", &sector);
	if (cap < sector + IO_BYTES / 512) {
		fail("blk%u: capacity %lu sectors too small", d->index, cap);
		return;
	}
	u8 *want = dma_alloc(IO_BYTES, 16), *got = dma_alloc(IO_BYTES, 16);
	fill_pattern(want, IO_BYTES, seed ^ d->index);
	u32 irqs = d->irq_count;

	if (!strncmp(mode, "write", 5)) {
		if ((st = blk_do(d, T_OUT, sector, want, IO_BYTES, 0)) != S_OK) {
			fail("blk%u: write status %d", d->index, st);
			return;
		}
		if ((st = blk_do(d, T_FLUSH, 0, NULL, 0, 0)) != S_OK) {
			fail("blk%u: flush status %d", d->index, st);
			return;
		}
		pr("probe: blk%u wrote %u bytes at sector %lu and flushed\n", d->index, IO_BYTES, sector);
	}
	if (!strncmp(mode, "ro", 2)) {
		if (!ro)
			fail("blk%u: read-only disk does not offer VIRTIO_BLK_F_RO", d->index);
		st = blk_do(d, T_OUT, sector, want, IO_BYTES, 0);
		if (st != S_IOERR)
			fail("blk%u: write to a read-only disk gave status %d, want IOERR (1)", d->index, st);
		else
			pr("probe: blk%u read-only write rejected with IOERR ok\n", d->index);
	}
	if ((st = blk_do(d, T_IN, sector, got, IO_BYTES, 1)) != S_OK) {
		fail("blk%u: read status %d", d->index, st);
		return;
	}
	if (!strncmp(mode, "ro", 2)) {
		pr("probe: blk%u read ok (first bytes %02x%02x%02x%02x)\n", d->index, got[0], got[1],
		   got[2], got[3]);
	} else if (memcmp(want, got, IO_BYTES)) {
		fail("blk%u: read back differs from the pattern (seed %lu)", d->index, seed);
	} else {
		pr("probe: blk%u %s ok: pattern read back (seed %lu)\n", d->index, mode, seed);
	}
	if (d->irq_count == irqs)
		fail("blk%u: no interrupts", d->index);
	if (d->missed_irq)
		fail("blk%u: %u completion(s) without an interrupt", d->index, d->missed_irq);
}

/* Drives every device the DSDT declares, as the command line asks. */
void virtio_run_all(void)
{
	virtio_discover();
	for (int i = 0; i < vdev_count; i++) {
		struct vdev *d = &vdevs[i];
		char key[16];
		switch (d->device_id) {
		case VIRTIO_ID_RNG:
			virtio_rng_test(d);
			break;
		case VIRTIO_ID_BLOCK: {
			memcpy(key, "probe.blk0", 11);
			key[9] = (char)('0' + (d->index % 10));
			const char *mode = cmdline_str(key);
			if (mode)
				virtio_blk_test(d, mode);
			break;
		}
		case VIRTIO_ID_NET:
			if (cmdline_flag("probe.net"))
				virtio_net_test(d);
			break;
		case VIRTIO_ID_BALLOON: {
			u64 mib;
			if (cmdline_u64("probe.balloon", &mib))
				virtio_balloon_test(d, mib);
			break;
		}
		case VIRTIO_ID_VSOCK:
			if (cmdline_str("probe.vsock_echo") || cmdline_str("probe.vsock_connect"))
				virtio_vsock_test(d);
			break;
		case VIRTIO_ID_FS:
			virtio_fs_test(d);
			break;
		}
	}
}
