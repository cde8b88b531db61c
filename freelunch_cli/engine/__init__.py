"""The windowed-stage engine below the stages: planning, claims, running windows, assembly, restoring evicted
dense activations, and which model of a work directory a stage reads."""
