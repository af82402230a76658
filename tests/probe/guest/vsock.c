/*
 * vsock.c - virtio-vsock driver test.
 *   probe.vsock_echo=PORT     stream echo server on guest port PORT: every
 *                             byte received goes back on its connection;
 *                             a payload starting "QUIT" ends the test
 *   probe.vsock_connect=PORT  a guest-initiated connection to CID 2 PORT:
 *                             sends "hello from the probe\n", prints the reply
 *   probe.vsock_ms=N          overall limit (default 60000)
 * Half-close on echo connections, both ways:
 *   - the peer's SHUTDOWN(SEND) alone: everything pending is echoed, then
 *     "<eof flags=F>" (F the flags received), then our SHUTDOWN(SEND);
 *   - a payload starting "HALF": echoed, then our SHUTDOWN(SEND); what the
 *     peer still sends is counted (not echoed) and reported at the end.
 *   A SHUTDOWN with both flags (or after both sides shut) gets RST.
 * Credit-based flow control both ways (buf_alloc/fwd_cnt), RST for unknown
 * connections, interrupt-driven completion.
 */
#include "virtio.h"

#define HOST_CID 2
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7

#define PKT_DATA 4096
#define RX_N 6			/* 2 descriptors each, 12 of 16 */
#define TX_N 8
#define MAX_CONNS 80
#define BUF_ALLOC 8192		/* our receive window per connection */
#define CONNECT_LOCAL_PORT 49152

struct vsock_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

struct conn {
	int used;
	int outgoing;
	u32 local_port, peer_port;
	u64 peer_cid;
	u32 peer_buf_alloc, peer_fwd_cnt;
	u32 tx_cnt;		/* bytes we sent */
	u32 fwd_cnt;		/* bytes we consumed */
	u32 pend_len;
	u8 *pend;
	int closing;
	int shut_after_flush;	/* send SHUTDOWN(SEND) once pend is empty */
	int shut_sent;		/* we sent SHUTDOWN(SEND) */
	int peer_eof;		/* the peer sent SHUTDOWN(SEND) */
};

struct slot {
	struct vsock_hdr *hdr;
	u8 *data;
	int busy;
};

/* Not zeroed at entry (every guest instruction is emulated here): set up
 * in virtio_vsock_test. */
#define NOINIT __attribute__((section(".bss.noinit")))
static struct conn conns[MAX_CONNS] NOINIT;
static u8 pend_store[MAX_CONNS][BUF_ALLOC] NOINIT;
static struct slot rx[VQ_SIZE] NOINIT, tx_slots[TX_N] NOINIT;
static int tx_of_head[VQ_SIZE] NOINIT;
static u64 guest_cid;
static struct vdev *dev;
static u32 n_conns, n_bytes, n_closed, max_open, open_now;
static u32 n_peer_half, n_our_half, n_after_shut;
static int quit, connect_state;
static char connect_reply[64];

static void copy(void *d, const void *s, usize n)
{
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}

static void post_rx(struct slot *s)
{
	struct vbuf b[2] = { { s->hdr, sizeof(struct vsock_hdr), 1 }, { s->data, PKT_DATA, 1 } };
	int id = vq_add(&dev->q[0], b, 2);
	if (id >= 0)
		rx[id] = *s;
}

static void reap_tx(void)
{
	int id;
	u32 len;
	while ((id = vq_pop(&dev->q[1], &len)) >= 0)
		if (tx_of_head[id] >= 0) {
			tx_slots[tx_of_head[id]].busy = 0;
			tx_of_head[id] = -1;
		}
}

static struct slot *tx_slot(int wait)
{
	for (u64 t = 0; t < 5000; t++) {
		reap_tx();
		for (int i = 0; i < TX_N; i++)
			if (!tx_slots[i].busy && dev->q[1].num_free >= 2)
				return &tx_slots[i];
		if (!wait)
			return NULL;
		wait_change(&dev->irq_count, dev->irq_count, 1);
	}
	fail("vsock: TX queue stuck");
	return NULL;
}

static int send_pkt(struct conn *c, u64 dst_cid, u32 src, u32 dst, u16 op, u32 flags,
		    const u8 *data, u32 len)
{
	struct slot *s = tx_slot(1);
	if (!s)
		return -1;
	struct vsock_hdr *h = s->hdr;
	h->src_cid = guest_cid;
	h->dst_cid = dst_cid;
	h->src_port = src;
	h->dst_port = dst;
	h->len = len;
	h->type = TYPE_STREAM;
	h->op = op;
	h->flags = flags;
	h->buf_alloc = BUF_ALLOC;
	h->fwd_cnt = c ? c->fwd_cnt : 0;
	if (len)
		copy(s->data, data, len);
	struct vbuf b[2] = { { h, sizeof(*h), 0 }, { s->data, len, 0 } };
	int id = vq_add(&dev->q[1], b, len ? 2 : 1);
	if (id < 0)
		return -1;
	s->busy = 1;
	tx_of_head[id] = (int)(s - tx_slots);
	vq_kick(dev, &dev->q[1]);
	if (c)
		c->tx_cnt += len;
	return 0;
}

static struct conn *find(u64 cid, u32 local, u32 peer)
{
	for (int i = 0; i < MAX_CONNS; i++)
		if (conns[i].used && conns[i].local_port == local && conns[i].peer_port == peer &&
		    conns[i].peer_cid == cid)
			return &conns[i];
	return NULL;
}

static void drop(struct conn *c)
{
	c->used = 0;
	n_closed++;
	open_now--;
}

/* Sends what the peer's credit allows from the connection's pending bytes. */
static void flush(struct conn *c)
{
	while (c->pend_len) {
		u32 credit = c->peer_buf_alloc - (c->tx_cnt - c->peer_fwd_cnt);
		u32 n = c->pend_len < PKT_DATA ? c->pend_len : PKT_DATA;
		if (n > credit)
			n = credit;
		if (!n)
			return;
		if (!tx_slot(0))
			return;
		c->fwd_cnt += n;	/* consumed from our window once echoed */
		if (send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_RW, 0, c->pend, n)) {
			c->fwd_cnt -= n;
			return;
		}
		c->pend_len -= n;
		if (c->pend_len)
			copy(c->pend, c->pend + n, c->pend_len);
	}
	if (c->shut_after_flush && !c->shut_sent) {
		if (send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_SHUTDOWN, 2, NULL, 0))
			return;
		c->shut_after_flush = 0;
		c->shut_sent = 1;
		n_our_half++;
	}
}

static void append(struct conn *c, const u8 *data, u32 n)
{
	if (c->pend_len + n > BUF_ALLOC)
		n = BUF_ALLOC - c->pend_len;
	copy(c->pend + c->pend_len, data, n);
	c->pend_len += n;
}

static void handle(const struct vsock_hdr *h, const u8 *data, u32 dlen, u32 echo_port)
{
	if (h->type != TYPE_STREAM || h->dst_cid != guest_cid) {
		fail("vsock: packet type %u to cid %lu", h->type, h->dst_cid);
		return;
	}
	struct conn *c = find(h->src_cid, h->dst_port, h->src_port);
	if (c) {
		c->peer_buf_alloc = h->buf_alloc;
		c->peer_fwd_cnt = h->fwd_cnt;
	}
	switch (h->op) {
	case OP_REQUEST:
		if (c || h->dst_port != echo_port) {
			send_pkt(NULL, h->src_cid, h->dst_port, h->src_port, OP_RST, 0, NULL, 0);
			return;
		}
		for (int i = 0; i < MAX_CONNS; i++)
			if (!conns[i].used) {
				c = &conns[i];
				break;
			}
		if (!c) {
			send_pkt(NULL, h->src_cid, h->dst_port, h->src_port, OP_RST, 0, NULL, 0);
			return;
		}
		memset(c, 0, sizeof(*c));
		c->used = 1;
		c->local_port = h->dst_port;
		c->peer_port = h->src_port;
		c->peer_cid = h->src_cid;
		c->peer_buf_alloc = h->buf_alloc;
		c->peer_fwd_cnt = h->fwd_cnt;
		c->pend = pend_store[c - conns];
		n_conns++;
		if (++open_now > max_open)
			max_open = open_now;
		send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_RESPONSE, 0, NULL, 0);
		return;
	case OP_RESPONSE:
		if (c && c->outgoing && connect_state == 1) {
			connect_state = 2;
			static const char hello[] = "hello from the probe\n";
			send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_RW, 0, (const u8 *)hello,
				 sizeof(hello) - 1);
		} else if (!c) {
			send_pkt(NULL, h->src_cid, h->dst_port, h->src_port, OP_RST, 0, NULL, 0);
		}
		return;
	case OP_RW:
		if (!c) {
			send_pkt(NULL, h->src_cid, h->dst_port, h->src_port, OP_RST, 0, NULL, 0);
			return;
		}
		n_bytes += dlen;
		if (c->outgoing) {
			u32 n = dlen < sizeof(connect_reply) - 1 ? dlen : sizeof(connect_reply) - 1;
			memcpy(connect_reply, data, n);
			connect_reply[n] = 0;
			for (u32 k = 0; k < n; k++)
				if (connect_reply[k] == '\n' || connect_reply[k] < 0x20 || connect_reply[k] > 0x7e)
					connect_reply[k] = k + 1 == n && connect_reply[k] == '\n' ? 0 : '.';
			c->fwd_cnt += dlen;
			connect_state = 3;
			send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_SHUTDOWN, 3, NULL, 0);
			return;
		}
		if (c->shut_sent || c->peer_eof) {
			/* We shut our sending side: count, consume, never echo. A
			 * peer that said it sends no more and does is reset. */
			if (c->peer_eof) {
				fail("vsock: data after the peer's SHUTDOWN(SEND)");
				send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_RST, 0, NULL, 0);
				drop(c);
				return;
			}
			n_after_shut += dlen;
			c->fwd_cnt += dlen;
			if (c->fwd_cnt % 4096 < dlen)
				send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_CREDIT_UPDATE, 0,
					 NULL, 0);
			return;
		}
		if (dlen >= 4 && !memcmp(data, "QUIT", 4))
			quit = 1;
		if (dlen >= 4 && !memcmp(data, "HALF", 4))
			c->shut_after_flush = 1;
		if (c->pend_len + dlen > BUF_ALLOC) {
			fail("vsock: peer overran our credit on port %u", c->peer_port);
			send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_RST, 0, NULL, 0);
			drop(c);
			return;
		}
		copy(c->pend + c->pend_len, data, dlen);
		c->pend_len += dlen;
		flush(c);
		return;
	case OP_CREDIT_REQUEST:
		if (c)
			send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_CREDIT_UPDATE, 0, NULL, 0);
		return;
	case OP_CREDIT_UPDATE:
		if (c)
			flush(c);
		return;
	case OP_SHUTDOWN:
		if (c && !c->outgoing && h->flags == 2 && !c->peer_eof) {
			/* Half-close: the peer still reads. Echo the rest, say what
			 * was seen, then shut our side too. */
			static char note[] = "<eof flags=2>";
			c->peer_eof = 1;
			n_peer_half++;
			if (!c->shut_sent) {
				append(c, (const u8 *)note, sizeof(note) - 1);
				c->shut_after_flush = 1;
				flush(c);
			}
			return;
		}
		if (c) {
			if (c->outgoing && connect_state < 4)
				connect_state = 4;
			send_pkt(c, c->peer_cid, c->local_port, c->peer_port, OP_RST, 0, NULL, 0);
			drop(c);
		}
		return;
	case OP_RST:
		if (c) {
			if (c->outgoing && connect_state < 4)
				connect_state = c->outgoing && connect_state >= 3 ? 4 : -1;
			drop(c);
		}
		return;
	default:
		fail("vsock: unknown op %u", h->op);
	}
}

void virtio_vsock_test(struct vdev *d)
{
	dev = d;
	if (vdev_init(d, 0) || vq_setup(d, 0) || vq_setup(d, 1) || vq_setup(d, 2))
		return;
	vdev_enable_irq(d);
	guest_cid = vcfg_read64(d, 0);
	memset(conns, 0, sizeof(conns));
	memset(rx, 0, sizeof(rx));
	for (int i = 0; i < VQ_SIZE; i++)
		tx_of_head[i] = -1;
	for (int i = 0; i < TX_N; i++) {
		tx_slots[i].hdr = dma_alloc(sizeof(struct vsock_hdr), 8);
		tx_slots[i].data = dma_alloc(PKT_DATA, 16);
		tx_slots[i].busy = 0;
	}
	for (int i = 0; i < RX_N; i++) {
		struct slot s = { dma_alloc(sizeof(struct vsock_hdr), 8), dma_alloc(PKT_DATA, 16), 0 };
		post_rx(&s);
	}
	/* The event queue: one buffer for transport events. */
	u8 *ev = dma_alloc(8, 8);
	struct vbuf evb = { ev, 8, 1 };
	vq_add(&d->q[2], &evb, 1);
	if (vdev_driver_ok(d))
		return;
	vq_kick(d, &d->q[0]);
	vq_kick(d, &d->q[2]);

	u64 echo_port = 0, connect_port = 0, limit = 60000;
	int echo = cmdline_u64("probe.vsock_echo", &echo_port);
	int connect = cmdline_u64("probe.vsock_connect", &connect_port);
	cmdline_u64("probe.vsock_ms", &limit);
	pr("probe: vsock%u guest_cid=%lu echo_port=%ld connect_port=%ld\n", d->index, guest_cid,
	   echo ? (s64)echo_port : -1L, connect ? (s64)connect_port : -1L);

	if (connect) {
		struct conn *c = &conns[MAX_CONNS - 1];
		memset(c, 0, sizeof(*c));
		c->used = 1;
		c->outgoing = 1;
		c->local_port = CONNECT_LOCAL_PORT;
		c->peer_port = (u32)connect_port;
		c->peer_cid = HOST_CID;
		c->pend = pend_store[MAX_CONNS - 1];
		open_now++;
		connect_state = 1;
		send_pkt(c, HOST_CID, c->local_port, c->peer_port, OP_REQUEST, 0, NULL, 0);
	}
	if (echo)
		pr("probe: vsock%u echo server listening on port %lu\n", d->index, echo_port);

	for (u64 t = 0; t < limit;) {
		int id;
		u32 len;
		int busy = 0;
		while ((id = vq_pop(&d->q[0], &len)) >= 0) {
			struct slot s = rx[id];
			busy = 1;
			if (len >= sizeof(struct vsock_hdr)) {
				u32 dlen = s.hdr->len;
				if (dlen > PKT_DATA || dlen > len - sizeof(struct vsock_hdr)) {
					fail("vsock: packet len %u in a %u-byte buffer", dlen, len);
					dlen = 0;
				}
				handle(s.hdr, s.data, dlen, echo ? (u32)echo_port : 0);
			}
			post_rx(&s);
			vq_kick(d, &d->q[0]);
		}
		while ((id = vq_pop(&d->q[2], &len)) >= 0) {
			pr("probe: vsock event 0x%x\n", *(u32 *)ev);
			vq_add(&d->q[2], &evb, 1);
			vq_kick(d, &d->q[2]);
		}
		reap_tx();
		for (int i = 0; i < MAX_CONNS; i++)
			if (conns[i].used && (conns[i].pend_len || conns[i].shut_after_flush))
				flush(&conns[i]);
		int connect_done = !connect || connect_state >= 4 || connect_state < 0;
		int echo_done = !echo || quit;
		if (connect_done && echo_done) {
			int pending = 0;
			for (int i = 0; i < MAX_CONNS; i++)
				pending |= conns[i].used && conns[i].pend_len;
			if (!pending)
				break;
		}
		if (!busy) {
			wait_change(&d->irq_count, d->irq_count, 1);
			t++;
		}
	}
	/* Let the last echo packets leave. */
	for (int k = 0; k < 100 && d->q[1].num_free < d->q[1].size; k++) {
		reap_tx();
		wait_change(&d->irq_count, d->irq_count, 1);
	}
	if (connect) {
		if (connect_state >= 3)
			pr("probe: vsock connect to cid 2 port %lu ok, reply \"%s\"\n", connect_port,
			   connect_reply);
		else
			fail("vsock: connection to cid 2 port %lu state %d", connect_port, connect_state);
	}
	if (echo) {
		pr("probe: vsock echo served %u connections (%u at once), %u bytes, %u closed\n", n_conns,
		   max_open, n_bytes, n_closed);
		pr("probe: vsock half-close: %u by the peer, %u by us, %u bytes received after ours\n",
		   n_peer_half, n_our_half, n_after_shut);
		if (!quit)
			fail("vsock: echo server timed out after %lu ms without QUIT", limit);
		else
			pr("probe: vsock echo ok\n");
	}
}
