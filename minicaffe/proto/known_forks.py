"""Fields of Caffe forks that minicaffe's caffe.proto does not carry, and the fork of each.

Used to finish a "has no field named X" parse error with where X comes from and what to do.
The fields minicaffe does carry (SSD, Faster R-CNN, PSPNet, SegNet, ...) are in caffe.proto.
"""
import re

__all__ = ["FORK_FIELDS", "FORK_LAYER_TYPES", "hint", "layer_type_hint"]

FORK_FIELDS = {
    # R-FCN (daijifeng001/caffe-rfcn)
    "psroi_pooling_param": "R-FCN (daijifeng001/caffe-rfcn)",
    "box_annotator_ohem_param": "R-FCN (daijifeng001/caffe-rfcn)",
    # DeepLab v2 (deeplab-public-ver2), beyond Interp
    "seg_accuracy_param": "DeepLab (deeplab-public-ver2)",
    "dense_crf_param": "DeepLab (deeplab-public-ver2)",
    "domain_transform_param": "DeepLab (deeplab-public-ver2)",
    "mat_read_param": "DeepLab (deeplab-public-ver2)",
    "mat_write_param": "DeepLab (deeplab-public-ver2)",
    "unique_label_param": "DeepLab (deeplab-public-ver2)",
    "bias_channel_param": "DeepLab (deeplab-public-ver2)",
    "adaptive_bias_channel_param": "DeepLab (deeplab-public-ver2)",
    # SegNet (alexgkendall/caffe-segnet), beyond Upsample and BN
    "dense_image_data_param": "SegNet (alexgkendall/caffe-segnet)",
    # YOLO ports
    "region_param": "YOLO v2 ports (e.g. gklz1982/caffe-yolov2)",
    "region_loss_param": "YOLO v2 ports (e.g. gklz1982/caffe-yolov2)",
    "yolo_detection_output_param": "MobileNet-YOLO (eric612/MobileNet-YOLO)",
    "yolov3_detection_output_param": "MobileNet-YOLO (eric612/MobileNet-YOLO)",
    "yolov3_param": "Caffe-YOLOv3 (eric612/Caffe-YOLOv3-Windows)",
    # FlowNet 2 (lmb-freiburg/flownet2)
    "correlation_param": "FlowNet (lmb-freiburg/flownet2)",
    "flow_warp_param": "FlowNet (lmb-freiburg/flownet2)",
    "augmentation_param": "FlowNet (lmb-freiburg/flownet2)",
    "resample_param": "FlowNet (lmb-freiburg/flownet2)",
    "l1_loss_param": "FlowNet (lmb-freiburg/flownet2)",
    "downsample_param": "FlowNet (lmb-freiburg/flownet2)",
    # face recognition forks
    "center_loss_param": "caffe-face (ydwen/caffe-face)",
    "margin_inner_product_param": "SphereFace (wy1iu/sphereface)",
    # Intel Caffe and Ristretto
    "multinode": "Intel Caffe (intel/caffe)",
    "mn_activation_param": "Intel Caffe (intel/caffe)",
    "quantization_param": "Ristretto / Intel Caffe",
    # spatial transformer networks
    "st_param": "Spatial Transformer (daerduoCarey/SpatialTransformerLayer)",
}

# Layer types of forks that minicaffe does not implement.
FORK_LAYER_TYPES = {
    "PSROIPooling": "R-FCN (daijifeng001/caffe-rfcn)",
    "BoxAnnotatorOHEM": "R-FCN (daijifeng001/caffe-rfcn)",
    "MultiBoxLoss": "SSD (weiliu89/caffe), training only",
    "AnnotatedData": "SSD (weiliu89/caffe), training only",
    "DetectionEvaluate": "SSD (weiliu89/caffe), training only",
    "VideoData": "SSD (weiliu89/caffe)",
    "Region": "YOLO v2 ports (e.g. gklz1982/caffe-yolov2)",
    "RegionLoss": "YOLO v2 ports (e.g. gklz1982/caffe-yolov2)",
    "Yolov3": "Caffe-YOLOv3 (eric612/Caffe-YOLOv3-Windows)",
    "Yolov3DetectionOutput": "MobileNet-YOLO (eric612/MobileNet-YOLO)",
    "Correlation": "FlowNet (lmb-freiburg/flownet2)",
    "FlowWarp": "FlowNet (lmb-freiburg/flownet2)",
    "Resample": "FlowNet (lmb-freiburg/flownet2)",
    "DenseCRF": "DeepLab (deeplab-public-ver2)",
    "SegAccuracy": "DeepLab (deeplab-public-ver2)",
    "CenterLoss": "caffe-face (ydwen/caffe-face)",
    "MarginInnerProduct": "SphereFace (wy1iu/sphereface)",
    "SpatialTransformer": "Spatial Transformer (daerduoCarey/SpatialTransformerLayer)",
}

_NO_FIELD = re.compile(r'has no field named "([A-Za-z0-9_]+)"')


def hint(message):
    """' (a field of FORK; ...)' for a parse error about a known fork field, else ''."""
    match = _NO_FIELD.search(message)
    if not match:
        return ""
    fork = FORK_FIELDS.get(match.group(1))
    if fork is None:
        return ""
    return (f" (a field of the Caffe fork {fork}, which minicaffe's schema lacks; bring that "
            f"fork's caffe.proto: minicaffe --proto its_caffe.proto ..., or "
            f"minicaffe.proto.extend(path))")


def layer_type_hint(type_name):
    """' It is a layer of the Caffe fork X ...' for a known fork layer type, else ''."""
    fork = FORK_LAYER_TYPES.get(type_name)
    if fork is None:
        return ""
    return (f" It is a layer of the Caffe fork {fork}, which minicaffe does not implement; "
            f"register it as a custom layer (with that fork's caffe.proto via --proto if it "
            f"has its own params).")
