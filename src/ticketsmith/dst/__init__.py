"""Dynamic sparse training: SRigL (constant fan-in + neuron ablation), RigL, SET."""
