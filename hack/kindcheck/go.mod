module sigs.k8s.io/kind/pkg/kindcheck

go 1.22

require sigs.k8s.io/kind v0.29.0

require (
	github.com/pkg/errors v0.9.1 // indirect
	sigs.k8s.io/yaml v1.4.0 // indirect
)
