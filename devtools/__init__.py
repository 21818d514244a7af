"""Development scaffolding for the tests, the benchmarks and the demo: seeded small models
(`devtools.synthetic`) and the tiny training set-up (`devtools.tiny_setup`). Not part of the
node pack or the trainer."""
