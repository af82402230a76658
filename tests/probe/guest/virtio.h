/*
 * virtio.h - the probe's minimal virtio-mmio (version 2) driver core:
 * device discovery from the DSDT, the spec's initialisation sequence,
 * split virtqueues, polled or interrupt-driven completion.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "probe.h"

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_BALLOON 5
#define VIRTIO_ID_VSOCK 19
#define VIRTIO_ID_FS 26

#define VIRTIO_F_VERSION_1 (1UL << 32)

#define VQ_MAX 4
#define VQ_SIZE 16

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2

struct vring_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} __attribute__((packed));

struct vring_avail {
	u16 flags;
	u16 idx;
	u16 ring[VQ_SIZE];
	u16 used_event;
} __attribute__((packed));

struct vring_used_elem {
	u32 id;
	u32 len;
} __attribute__((packed));

struct vring_used {
	u16 flags;
	u16 idx;
	struct vring_used_elem ring[VQ_SIZE];
	u16 avail_event;
} __attribute__((packed));

struct vq {
	u32 index;
	u16 size;
	u16 free_head;
	u16 num_free;
	u16 last_used;
	volatile struct vring_desc *desc;
	volatile struct vring_avail *avail;
	volatile struct vring_used *used;
};

struct vdev {
	u64 base;
	u32 size;
	u32 gsi;
	u32 device_id;
	u32 index;		/* among devices of the same type */
	u64 features;		/* negotiated */
	u64 offered;
	int use_irq;
	u8 vector;
	volatile u32 irq_count;
	volatile u32 isr_bits;
	u32 kick_irq;		/* irq_count at the last kick */
	u32 missed_irq;		/* completions that came without an interrupt */
	struct vq q[VQ_MAX];
};

struct vbuf {
	void *addr;
	u32 len;
	int device_writes;
};

#define VDEV_MAX 16
extern struct vdev vdevs[VDEV_MAX];
extern int vdev_count;

/* DMA memory: from a static pool in the kernel mapping. */
void *dma_alloc(usize size, usize align);
u64 virt_to_phys(const void *p);

void virtio_discover(void);
int vdev_init(struct vdev *d, u64 wanted);
int vq_setup(struct vdev *d, u32 index);
int vdev_driver_ok(struct vdev *d);
void vdev_enable_irq(struct vdev *d);
int vq_add(struct vq *q, const struct vbuf *bufs, int n);
void vq_kick(struct vdev *d, struct vq *q);
/* Next used chain: returns its head id (and length) or -1. Frees it. */
int vq_pop(struct vq *q, u32 *len);
/* Waits (irq or poll) for a used chain, up to timeout_ms; -1 on timeout. */
int vq_wait(struct vdev *d, struct vq *q, u32 *len, u64 timeout_ms);
u32 vcfg_read32(struct vdev *d, u32 off);
u64 vcfg_read64(struct vdev *d, u32 off);
u8 vcfg_read8(struct vdev *d, u32 off);

/* Drivers (return number of failures they reported). */
void virtio_rng_test(struct vdev *d);
void virtio_blk_test(struct vdev *d, const char *mode);
void virtio_net_test(struct vdev *d);
void virtio_vsock_test(struct vdev *d);
void virtio_balloon_test(struct vdev *d, u64 mib);
void virtio_fs_test(struct vdev *d);
void virtio_run_all(void);

/* Deterministic pattern shared with the host test (xorshift64*). */
void fill_pattern(u8 *buf, usize n, u64 seed);

/* IOAPIC / interrupt helpers (ioapic.c). */
void ioapic_route(u32 gsi, u8 vector, u32 apic_id);
void ioapic_mask(u32 gsi);

#endif
