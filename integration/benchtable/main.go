// Command benchtable turns the output of the integration benchmarks (several
// rounds of "go test -bench -count 1", one after the other) into the
// Markdown table of docs/BENCHMARKS.md: the median rate of each workload
// natively and through the mount in each mode, the ratio to native, and the
// FUSE requests lfuse served and the CPU time it used per operation.
//
// Ratios are paired: each round's mount rate is divided by the same round's
// native rate, and the table gives the median of those ratios with their
// range. On a noisy machine the rates drift between rounds far more than
// between the setups of one round, so pairing is what makes ratios fair.
package main

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

var lineRe = regexp.MustCompile(`^Benchmark(\S+?)/(native|passthrough|cached)(-\d+)?\s+\d+\s+\S+ ns/op\s+(.*)$`)

type key struct{ workload, setup string }

func main() {
	rates := map[key][]float64{}
	adjacent := map[key][]float64{} // ratios to a native run of the same work just before

	units := map[string]string{}
	reqs := map[key]map[string][]float64{}
	cpu := map[key][]float64{}
	var order []string
	sc := bufio.NewScanner(os.Stdin)
	for sc.Scan() {
		m := lineRe.FindStringSubmatch(strings.Join(strings.Fields(sc.Text()), " "))
		if m == nil {
			continue
		}
		k := key{m[1], m[2]}
		if !slices.Contains(order, k.workload) {
			order = append(order, k.workload)
		}
		f := strings.Fields(m[4])
		for i := 0; i+1 < len(f); i += 2 {
			v, err := strconv.ParseFloat(f[i], 64)
			if err != nil {
				continue
			}
			unit := f[i+1]
			switch {
			case unit == "x-native":
				adjacent[k] = append(adjacent[k], v)
			case strings.HasSuffix(unit, "/s"):
				rates[k] = append(rates[k], v)
				units[k.workload] = unit
			case strings.HasPrefix(unit, "lfuse-cpu-us/"):
				cpu[k] = append(cpu[k], v)
			case strings.HasPrefix(unit, "req"):
				if reqs[k] == nil {
					reqs[k] = map[string][]float64{}
				}
				reqs[k][unit] = append(reqs[k][unit], v)
			}
		}
	}
	write(os.Stdout, order, rates, adjacent, units, reqs, cpu)
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func write(w io.Writer, order []string, rates, adjacent map[key][]float64, units map[string]string, reqs map[key]map[string][]float64, cpu map[key][]float64) {
	fmt.Fprintln(w, "| workload | unit | native | passthrough | ratio (range) | cached | ratio (range) | rounds |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---:|---:|---:|")
	for _, wl := range order {
		native := rates[key{wl, "native"}]
		p, c := rates[key{wl, "passthrough"}], rates[key{wl, "cached"}]
		pr, cr := pairedRatio(p, native), pairedRatio(c, native)
		if a := adjacent[key{wl, "passthrough"}]; len(a) > 0 {
			pr = spread(a) + "*"
		}
		if a := adjacent[key{wl, "cached"}]; len(a) > 0 {
			cr = spread(a) + "*"
		}
		fmt.Fprintf(w, "| %s | %s | %.0f | %.0f | %s | %.0f | %s | %d |\n", wl, units[wl],
			median(native), median(p), pr, median(c), cr, len(native))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "\\* disk-bound workloads: each run through the mount is compared with a native run of the same work")
	fmt.Fprintln(w, "right before it (the rates drift with the shared disk far more than the two setups differ).")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "FUSE requests lfuse served per operation (median; kinds under 0.001 per operation left out):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| workload | passthrough | cached |")
	fmt.Fprintln(w, "|---|---|---|")
	for _, wl := range order {
		fmt.Fprintf(w, "| %s | %s | %s |\n", wl, reqSummary(reqs[key{wl, "passthrough"}]), reqSummary(reqs[key{wl, "cached"}]))
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "CPU time lfuse used per operation (median, µs; serving requests and capturing, all threads):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| workload | unit | passthrough | cached |")
	fmt.Fprintln(w, "|---|---|---:|---:|")
	for _, wl := range order {
		unit := strings.TrimSuffix(units[wl], "/s")
		fmt.Fprintf(w, "| %s | µs/%s | %s | %s |\n", wl, unit, cpuCell(cpu[key{wl, "passthrough"}]), cpuCell(cpu[key{wl, "cached"}]))
	}
}

func cpuCell(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f", median(v))
}

// pairedRatio is the median of a[i]/b[i] over the rounds, with the range.
func pairedRatio(a, b []float64) string {
	var r []float64
	for i := range min(len(a), len(b)) {
		if b[i] > 0 {
			r = append(r, a[i]/b[i])
		}
	}
	return spread(r)
}

// spread is the median of r with its range.
func spread(r []float64) string {
	if len(r) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2f (%.2f–%.2f)", median(r), slices.Min(r), slices.Max(r))
}

func reqSummary(m map[string][]float64) string {
	if m == nil {
		return "-"
	}
	var total string
	var parts []string
	for unit, v := range m {
		med := median(v)
		name := strings.TrimPrefix(unit, "req-")
		name = name[:strings.Index(name, "/")]
		if strings.HasPrefix(unit, "req/") {
			total = fmt.Sprintf("%.3f total", med)
			continue
		}
		if med >= 0.001 {
			parts = append(parts, fmt.Sprintf("%s %.3f", name, med))
		}
	}
	sort.Strings(parts)
	return strings.Join(append([]string{total}, parts...), ", ")
}
