package replicate

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
		want := crc64.Checksum(buf[:n], isoTable)
		got := crcCombine(crc64.Checksum(a, isoTable), crc64.Checksum(b, isoTable), crcShift(int64(len(b))))
		if got != want {
			t.Fatalf("combine at %d of %d: got %016x, want %016x", cut, n, got, want)
		}
	}
	if got := crcCombine(0, 0, crcShift(0)); got != 0 {
		t.Fatalf("two empty inputs: %016x", got)
	}
}

func BenchmarkCRCMul(b *testing.B) {
	shift := crcShift(4096)
	x := uint64(0x0123456789abcdef)
	for b.Loop() {
		x = crcMul(x, shift)
	}
	_ = x
}
