package crc64iso

import (
	"hash/crc64"
	"math/rand/v2"
	"testing"
)

func TestCRCCombine(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	buf := make([]byte, 70000)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	for range 500 {
		n := rng.IntN(len(buf))
		cut := rng.IntN(n + 1)
		a, b := buf[:cut], buf[cut:n]
		want := crc64.Checksum(buf[:n], table)
		got := Combine(crc64.Checksum(a, table), crc64.Checksum(b, table), Shift(int64(len(b))))
		if got != want {
			t.Fatalf("combine at %d of %d: got %016x, want %016x", cut, n, got, want)
		}
	}
	if got := Combine(0, 0, Shift(0)); got != 0 {
		t.Fatalf("two empty inputs: %016x", got)
	}
}

func BenchmarkCRCMul(b *testing.B) {
	shift := Shift(4096)
	x := uint64(0x0123456789abcdef)
	for b.Loop() {
		x = mul(x, shift)
	}
	_ = x
}

func TestCRCUpdate(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	buf := make([]byte, 1100)
	for i := range buf {
		buf[i] = byte(rng.Uint32())
	}
	for n := range len(buf) {
		for _, init := range []uint64{0, ^uint64(0), rng.Uint64()} {
			if got, want := Update(init, buf[:n]), crc64.Update(init, table, buf[:n]); got != want {
				t.Fatalf("%d bytes from %016x: got %016x, want %016x", n, init, got, want)
			}
		}
	}
}

func FuzzCRCUpdate(f *testing.F) {
	f.Add(uint64(0), []byte("123456789"))
	f.Fuzz(func(t *testing.T, init uint64, p []byte) {
		if got, want := Update(init, p), crc64.Update(init, table, p); got != want {
			t.Fatalf("got %016x, want %016x", got, want)
		}
	})
}

// CRC-64 of a 4 KB page: hash/crc64 against Update.
func BenchmarkCRCPage(b *testing.B) {
	page := make([]byte, 4096)
	b.Run("stdlib", func(b *testing.B) {
		b.SetBytes(int64(len(page)))
		for b.Loop() {
			crc64.Update(0, table, page)
		}
	})
	b.Run("Update", func(b *testing.B) {
		b.SetBytes(int64(len(page)))
		for b.Loop() {
			Update(0, page)
		}
	})
}
