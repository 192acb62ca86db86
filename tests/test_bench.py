"""`moderncnn bench`: the side-by-side table, for networks with and without a torchvision twin."""
from moderncnn.bench import has_torchvision_counterpart, run_benchmark


def test_bench_pairs_torchvision_twins_and_measures_our_own_networks_alone():
    assert has_torchvision_counterpart("resnet18") and has_torchvision_counterpart("densenet_bc_100")
    assert not has_torchvision_counterpart("densenet_bc_cifar") and not has_torchvision_counterpart("nin")
    printed = []
    rows = run_benchmark(["densenet_bc_cifar", "resnet18"], input_size=(3, 32, 32), batch=2, steps=1,
                         eval_batch=2, isolate=False, out=printed.append, repeats=1)
    ours, paired = rows
    assert "tv_train" not in ours and "tv_eval" not in ours
    assert ours["ours_train"]["images_per_second"] > 0 and ours["ours_train_me"]["images_per_second"] > 0
    assert paired["tv_train"]["impl"] == "torchvision" and paired["ours_train"]["impl"] == "moderncnn"
    text = "\n".join(printed)
    assert "densenet_bc_cifar (cpu, input 3x32x32, train batch 2, eval batch 2): no torchvision counterpart" in text
    assert "torchvision train" in text.split("resnet18")[1] and text.count("optimize_for_inference") == 2
    ratio_lines = [l for l in text.split("resnet18")[1].splitlines() if l.strip().startswith("moderncnn train")]
    assert ratio_lines and ratio_lines[0].rstrip().endswith("x")  # speed and memory against torchvision
