"""Draw the trained bundle's prediction on a validation patient: an overlay montage PNG.

Uses the bundle's own config (same preprocessing, network and slice inferer as validation) with the
settings stored in the checkpoint (variant, width, image size, HU window ...), and the best
checkpoint. Run after training, e.g. after `make demo`:

    python workflows/overlay.py --dataset_dir data/phantoms/prepared --out bundle/eval/overlay.png \
        --config "['bundle/configs/train.json','bundle/configs/quick.json']"
"""

from __future__ import annotations

import argparse
import ast

import torch
from monai.bundle import ConfigParser

from liver_fcn.checkpoint import load_model_state
from liver_fcn.visualize import overlay_montage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="bundle/configs/train.json", help="config file, or a Python list of them")
    p.add_argument("--dataset_dir", required=True)
    p.add_argument("--checkpoint", default="bundle/models/model.pt")
    p.add_argument("--case", type=int, default=0, help="index in the validation split")
    p.add_argument("--out", default="bundle/eval/overlay.png")
    p.add_argument(
        "--tracking_uri",
        help="MLflow store of the checkpoint's training run, to log the picture into "
        "(default: $MLFLOW_TRACKING_URI or bundle/eval/mlruns.db); 'none' to skip",
    )
    args = p.parse_args()

    files = ast.literal_eval(args.config) if args.config.startswith("[") else args.config
    parser = ConfigParser()
    parser.read_config(files)
    parser["dataset_dir"] = args.dataset_dir
    parser["device"] = "$torch.device('cpu')"
    state, settings = load_model_state(args.checkpoint)
    # the checkpoint's settings are the model settings, as evaluate.json sets them
    parser["model_settings"], parser["class_names"] = settings, settings["class_names"]
    parser["network_def"] = "$liver_fcn.checkpoint.network_from_settings(@model_settings)"
    item = parser.get_parsed_content("validate#dataset")[args.case]
    parser.get_parsed_content("network_def").load_state_dict(state)
    net = parser.get_parsed_content("network")  # the weights above, in the checkpoint's precision
    net.eval()
    with torch.no_grad():
        logits = parser.get_parsed_content("validate#inferer")(item["image"][None], net)
    pred = logits.argmax(1)[0].numpy()
    image = item["image"][0].numpy()
    truth = item["label"][0].numpy()
    names = parser.get_parsed_content("class_names")
    out = overlay_montage(
        image,
        args.out,
        pred=pred,
        truth=truth,
        class_names=names,
        title=f"{parser.get_parsed_content('validate#files')[args.case]['patient']}: prediction and reference",
    )
    print(f"wrote {out}")
    if (args.tracking_uri or "").lower() != "none":  # not given: the default store
        from liver_fcn.runs import resolve_tracking_uri, run_id_of

        uri = resolve_tracking_uri("bundle/eval", args.tracking_uri)
        run_id = run_id_of(uri, settings.get("experiment_name", "liver-fcn"), settings.get("run_name"))
        if run_id:
            import mlflow

            mlflow.MlflowClient(tracking_uri=uri).log_artifact(run_id, str(out), "plots")
            print(f"logged it to MLflow run {settings.get('run_name')} ({run_id}) under plots/")


if __name__ == "__main__":
    main()
