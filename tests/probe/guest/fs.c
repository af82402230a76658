/*
 * fs.c - virtio-fs driver test (FUSE over the request queue, interrupt-
 * driven completion; the hiprio queue is set up but unused):
 *   FUSE_INIT, then, per command-line switch,
 *   probe.fs_read=NAME    LOOKUP, OPEN, READ (probe.fs_len bytes), RELEASE;
 *                         the bytes must be fill_pattern(probe.fs_seed)
 *   probe.fs_write=NAME   CREATE, WRITE fill_pattern(probe.fs_seed + 1),
 *                         RELEASE (the host test reads the file back)
 *   probe.fs_expect_error=N  the write's CREATE must fail with -N (EROFS=30)
 *   probe.fs_until_error_ms=MS  then LOOKUP every 20 ms until a request
 *                         fails (the host killed the backend), up to MS
 * Every reply must carry the request's unique and a sane length.
 */
#include "virtio.h"

#define FUSE_LOOKUP 1
#define FUSE_OPEN 14
#define FUSE_READ 15
#define FUSE_WRITE 16
#define FUSE_RELEASE 18
#define FUSE_INIT 26
#define FUSE_CREATE 35
#define FUSE_ROOT_ID 1

#define FS_IO_MAX 8192
#define FS_NAME_MAX 64

struct fuse_in_header {
	u32 len;
	u32 opcode;
	u64 unique;
	u64 nodeid;
	u32 uid;
	u32 gid;
	u32 pid;
	u16 total_extlen;
	u16 padding;
} __attribute__((packed));

struct fuse_out_header {
	u32 len;
	int error;
	u64 unique;
} __attribute__((packed));

struct fs_ctx {
	struct vdev *d;
	u64 unique;
	struct fuse_in_header *in;
	u8 *in_body;		/* request body after the header */
	struct fuse_out_header *out;
	u8 *out_body;		/* reply body after the header */
	u8 *data;		/* READ target / WRITE source */
};

/* One request on queue 1: header + body (+ data to write) readable,
 * out header + reply body (+ data to read) writable. Returns the FUSE
 * error (0 or -errno), or 1 on a transport failure (already reported). */
static int fs_call(struct fs_ctx *c, u32 opcode, u64 nodeid, u32 body_len, u32 wdata,
		   u32 reply_len, u32 rdata)
{
	struct vbuf b[5];
	int n = 0;
	c->unique += 2;
	c->in->len = (u32)(sizeof(*c->in) + body_len + wdata);
	c->in->opcode = opcode;
	c->in->unique = c->unique;
	c->in->nodeid = nodeid;
	c->in->uid = 0;
	c->in->gid = 0;
	c->in->pid = 1;
	c->in->total_extlen = 0;
	c->in->padding = 0;
	c->out->len = 0xffffffff;
	c->out->error = 0x7fffffff;
	c->out->unique = 0;
	b[n++] = (struct vbuf){ c->in, sizeof(*c->in), 0 };
	if (body_len)
		b[n++] = (struct vbuf){ c->in_body, body_len, 0 };
	if (wdata)
		b[n++] = (struct vbuf){ c->data, wdata, 0 };
	b[n++] = (struct vbuf){ c->out, sizeof(*c->out), 1 };
	if (reply_len)
		b[n++] = (struct vbuf){ c->out_body, reply_len, 1 };
	if (rdata)
		b[n++] = (struct vbuf){ c->data, rdata, 1 };
	struct vq *q = &c->d->q[1];
	if (vq_add(q, b, n) < 0) {
		fail("fs%u: queue full", c->d->index);
		return 1;
	}
	vq_kick(c->d, q);
	u32 used = 0;
	if (vq_wait(c->d, q, &used, 10000) < 0) {
		fail("fs%u: opcode %u got no reply within 10 s", c->d->index, opcode);
		return 1;
	}
	if (c->out->unique != c->unique) {
		fail("fs%u: opcode %u: reply unique %lu, want %lu", c->d->index, opcode,
		     c->out->unique, c->unique);
		return 1;
	}
	if (used < sizeof(*c->out) || c->out->len != used ||
	    used > sizeof(*c->out) + reply_len + rdata) {
		fail("fs%u: opcode %u: used %u, header len %u", c->d->index, opcode, used,
		     c->out->len);
		return 1;
	}
	return c->out->error;
}

static u32 put_name(u8 *dst, const char *name)
{
	u32 n = 0;
	while (name[n] && name[n] != ' ' && n + 1 < FS_NAME_MAX) {
		dst[n] = (u8)name[n];
		n++;
	}
	dst[n++] = 0;
	return n;
}

static void put32(u8 *p, u32 v) { memcpy(p, &v, 4); }
static void put64(u8 *p, u64 v) { memcpy(p, &v, 8); }
static u64 get64(const u8 *p) { u64 v; memcpy(&v, p, 8); return v; }
static u32 get32(const u8 *p) { u32 v; memcpy(&v, p, 4); return v; }

static int fs_init(struct fs_ctx *c)
{
	memset(c->in_body, 0, 16);
	put32(c->in_body, 7);		/* major */
	put32(c->in_body + 4, 31);	/* minor */
	int e = fs_call(c, FUSE_INIT, 0, 16, 0, 64, 0);
	if (e) {
		if (e != 1)
			fail("fs%u: FUSE_INIT error %d", c->d->index, e);
		return -1;
	}
	pr("probe: fs%u FUSE_INIT ok: protocol %u.%u max_write %u\n", c->d->index,
	   get32(c->out_body), get32(c->out_body + 4), get32(c->out_body + 20));
	return 0;
}

static int fs_release(struct fs_ctx *c, u64 node, u64 fh)
{
	memset(c->in_body, 0, 24);
	put64(c->in_body, fh);
	int e = fs_call(c, FUSE_RELEASE, node, 24, 0, 0, 0);
	if (e && e != 1)
		fail("fs%u: RELEASE error %d", c->d->index, e);
	return e;
}

static void fs_read_test(struct fs_ctx *c, const char *name, u64 len, u64 seed)
{
	u32 nl = put_name(c->in_body, name);
	int e = fs_call(c, FUSE_LOOKUP, FUSE_ROOT_ID, nl, 0, 128, 0);
	if (e) {
		if (e != 1)
			fail("fs%u: LOOKUP %s error %d", c->d->index, name, e);
		return;
	}
	u64 node = get64(c->out_body), size = get64(c->out_body + 48);
	if (size != len) {
		fail("fs%u: %s has size %lu, want %lu", c->d->index, name, size, len);
		return;
	}
	memset(c->in_body, 0, 8);	/* flags O_RDONLY */
	e = fs_call(c, FUSE_OPEN, node, 8, 0, 16, 0);
	if (e) {
		if (e != 1)
			fail("fs%u: OPEN error %d", c->d->index, e);
		return;
	}
	u64 fh = get64(c->out_body);
	memset(c->in_body, 0, 40);
	put64(c->in_body, fh);
	put64(c->in_body + 8, 0);
	put32(c->in_body + 16, (u32)len);
	memset(c->data, 0, len);
	e = fs_call(c, FUSE_READ, node, 40, 0, 0, (u32)len);
	if (e) {
		if (e != 1)
			fail("fs%u: READ error %d", c->d->index, e);
		return;
	}
	u32 got = c->out->len - (u32)sizeof(*c->out);
	static u8 want[FS_IO_MAX];
	fill_pattern(want, len, seed);
	if (got != len || memcmp(c->data, want, len))
		fail("fs%u: READ %s returned %u bytes, not the pattern of %lu", c->d->index, name,
		     got, len);
	else
		pr("probe: fs%u read %s: %u bytes match (seed %lu)\n", c->d->index, name, got, seed);
	fs_release(c, node, fh);
}

static void fs_write_test(struct fs_ctx *c, const char *name, u64 len, u64 seed, u64 expect)
{
	memset(c->in_body, 0, 16);
	put32(c->in_body, 01 | 0100 | 01000);	/* O_WRONLY | O_CREAT | O_TRUNC */
	put32(c->in_body + 4, 0100644);		/* S_IFREG | 0644 */
	put32(c->in_body + 8, 022);
	u32 nl = put_name(c->in_body + 16, name);
	int e = fs_call(c, FUSE_CREATE, FUSE_ROOT_ID, 16 + nl, 0, 128 + 16, 0);
	if (expect) {
		if (e == -(int)expect)
			pr("probe: fs%u create %s refused with error %d as expected\n", c->d->index,
			   name, e);
		else if (e != 1)
			fail("fs%u: CREATE %s returned %d, want %d", c->d->index, name, e,
			     -(int)expect);
		return;
	}
	if (e) {
		if (e != 1)
			fail("fs%u: CREATE %s error %d", c->d->index, name, e);
		return;
	}
	u64 node = get64(c->out_body), fh = get64(c->out_body + 128);
	fill_pattern(c->data, len, seed);
	memset(c->in_body, 0, 40);
	put64(c->in_body, fh);
	put64(c->in_body + 8, 0);
	put32(c->in_body + 16, (u32)len);
	e = fs_call(c, FUSE_WRITE, node, 40, (u32)len, 8, 0);
	if (e) {
		if (e != 1)
			fail("fs%u: WRITE error %d", c->d->index, e);
		return;
	}
	if (get32(c->out_body) != len)
		fail("fs%u: WRITE wrote %u of %lu bytes", c->d->index, get32(c->out_body), len);
	else if (!fs_release(c, node, fh))
		pr("probe: fs%u wrote %s: %lu bytes (seed %lu)\n", c->d->index, name, len, seed);
}

static void fs_until_error(struct fs_ctx *c, const char *name, u64 ms)
{
	pr("probe: fs%u polling until a request fails\n", c->d->index);
	for (u64 t = 0; t <= ms; t += 20) {
		u32 nl = put_name(c->in_body, name);
		int e = fs_call(c, FUSE_LOOKUP, FUSE_ROOT_ID, nl, 0, 128, 0);
		if (e == 1)
			return;
		if (e) {
			pr("probe: fs%u request failed with error %d after the backend went\n",
			   c->d->index, e);
			return;
		}
		hold_ms(20);
	}
	fail("fs%u: no request failed within %lu ms", c->d->index, ms);
}

void virtio_fs_test(struct vdev *d)
{
	if (vdev_init(d, 0) || vq_setup(d, 0) || vq_setup(d, 1))
		return;
	vdev_enable_irq(d);
	if (vdev_driver_ok(d))
		return;
	char tag[37];
	for (int i = 0; i < 36; i++)
		tag[i] = (char)vcfg_read8(d, (u32)i);
	tag[36] = 0;
	pr("probe: fs%u tag \"%s\" request queues %u\n", d->index, tag, vcfg_read32(d, 36));
	static struct fs_ctx c;
	c.d = d;
	c.unique = 0;
	c.in = dma_alloc(sizeof(*c.in), 8);
	c.in_body = dma_alloc(256, 8);
	c.out = dma_alloc(sizeof(*c.out), 8);
	c.out_body = dma_alloc(256, 8);
	c.data = dma_alloc(FS_IO_MAX, 8);
	if (fs_init(&c))
		return;
	u64 len = 4096, seed = 1, expect = 0, ms = 0;
	cmdline_u64("probe.fs_len", &len);
	cmdline_u64("probe.fs_seed", &seed);
	cmdline_u64("probe.fs_expect_error", &expect);
	if (len == 0 || len > FS_IO_MAX) {
		fail("fs%u: probe.fs_len %lu out of range (1..%u)", d->index, len, FS_IO_MAX);
		return;
	}
	/* cmdline_str returns one static buffer: copy each name out. */
	static char rname[FS_NAME_MAX], wname[FS_NAME_MAX];
	const char *r = cmdline_str("probe.fs_read");
	if (r) {
		put_name((u8 *)rname, r);
		fs_read_test(&c, rname, len, seed);
	}
	const char *w = cmdline_str("probe.fs_write");
	if (w) {
		put_name((u8 *)wname, w);
		fs_write_test(&c, wname, len, seed + 1, expect);
	}
	if (d->missed_irq)
		fail("fs%u: %u completion(s) without an interrupt", d->index, d->missed_irq);
	else if (!(d->isr_bits & 1))
		fail("fs%u: InterruptStatus never showed a used buffer", d->index);
	else
		pr("probe: fs%u ok (interrupts %u, InterruptStatus used-buffer bit seen)\n",
		   d->index, d->irq_count);
	if (cmdline_u64("probe.fs_until_error_ms", &ms) && ms && r)
		fs_until_error(&c, rname, ms);
}
